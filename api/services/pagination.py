"""Keyset pagination over a monotonically increasing id: newest first, `after` continues older."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session


def page(session: Session, stmt: Select, id_column: Any, after: Any | None, limit: int) -> tuple[list, bool]:
    if after is not None:
        stmt = stmt.where(id_column < after)
    rows = list(session.scalars(stmt.order_by(id_column.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit

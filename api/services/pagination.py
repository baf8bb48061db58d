"""Keyset pagination over a monotonically increasing id: newest first (or oldest first), `after` continues in
the same order."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import Select
from sqlalchemy.orm import Session

ListOrder = Literal["asc", "desc"]


def page(
    session: Session, stmt: Select, id_column: Any, after: Any | None, limit: int, order: ListOrder = "desc"
) -> tuple[list, bool]:
    if order == "asc":
        if after is not None:
            stmt = stmt.where(id_column > after)
        stmt = stmt.order_by(id_column.asc())
    else:
        if after is not None:
            stmt = stmt.where(id_column < after)
        stmt = stmt.order_by(id_column.desc())
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit

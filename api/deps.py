"""Request-scoped dependencies: the database session (the only place that commits) and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.db import session_scope
from models.errors import Unauthorized
from models.project import ApiKey, Project, hash_key


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# "function" scope: commit before the response goes out, so a 2xx means the change is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_project(request: Request, session: SessionDep) -> Project:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
    project = session.scalar(
        select(Project)
        .join(ApiKey, ApiKey.project_id == Project.id)
        .where(ApiKey.key_hash == hash_key(key.strip()), ApiKey.revoked_at.is_(None))
    )
    if project is None:
        raise Unauthorized("Incorrect API key provided.")
    return project


ProjectDep = Annotated[Project, Depends(get_project)]

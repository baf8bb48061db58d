"""Request-scoped dependencies: the database session (the only place that commits) and the caller.

A key is looked up by its sha256 (models/project.py), never compared with a stored key. Its scope decides
what it reaches: a project key its own project's resources (`ProjectDep`), an admin key the key management
routes (`AdminDep`); each gets 403 on the other's routes.

JSON reads (the GET routes that answer from the database: objects, lists, events) take `ProjectReadDep` or
`AdminReadDep` instead: the route is `async` and awaits `read(lambda session, project: ...)`, which opens the
session, checks the key, runs the read and commits in ONE thread-pool call. Each sync dependency and a sync
route is a hand-off between the event loop and the thread pool, and on status polling those hand-offs, not
the database, were the cost (docs/RELIABILITY.md, Load). The checks and their errors are the same as with
`SessionDep` + `ProjectDep`; a missing key is still refused before the route's parameters are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from models.db import session_scope
from models.errors import PermissionDenied, Unauthorized
from models.project import ADMIN_SCOPE, PROJECT_SCOPE, ApiKey, Project, hash_key


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# "function" scope: commit before the response goes out, so a 2xx means the change is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
    return key.strip()


def _caller(request: Request, session: Session) -> tuple[ApiKey, Project | None]:
    found = session.execute(
        select(ApiKey, Project)
        .outerjoin(Project, Project.id == ApiKey.project_id)
        .where(ApiKey.key_hash == hash_key(bearer_key(request)), ApiKey.revoked_at.is_(None))
    ).first()
    if found is None:
        raise Unauthorized("Incorrect API key provided.")
    return found[0], found[1]


def get_project(request: Request, session: SessionDep) -> Project:
    key, project = _caller(request, session)
    if key.scope != PROJECT_SCOPE or project is None:
        raise PermissionDenied(
            "This is an admin key: it manages API keys (/v1/admin/keys) and nothing else. "
            "Use a project key for files, jobs and the other resources."
        )
    return project


def get_admin_key(request: Request, session: SessionDep) -> ApiKey:
    key, _ = _caller(request, session)
    if key.scope != ADMIN_SCOPE:
        raise PermissionDenied(
            "Managing API keys needs an admin key (grove keys create --admin); this key belongs to a project."
        )
    return key


ProjectDep = Annotated[Project, Depends(get_project)]
AdminDep = Annotated[ApiKey, Depends(get_admin_key)]


T = TypeVar("T")
C = TypeVar("C")


class Read(Generic[C]):
    """A read in one thread-pool call: `await read(fn)` returns fn(session, caller) after the commit."""

    def __init__(self, request: Request, caller: Callable[[Request, Session], C]):
        self.request = request
        self.caller = caller

    async def __call__(self, fn: Callable[[Session, C], T]) -> T:
        return await run_in_threadpool(self._run, fn)

    def _run(self, fn: Callable[[Session, C], T]) -> T:
        with session_scope() as session:
            return fn(session, self.caller(self.request, session))


# async: resolved on the event loop, no thread hop (and no I/O: the key is checked inside the read).
async def project_read(request: Request) -> Read[Project]:
    bearer_key(request)  # a missing key is a 401 before the route's parameters, as with ProjectDep
    return Read(request, get_project)


async def admin_read(request: Request) -> Read[ApiKey]:
    bearer_key(request)
    return Read(request, get_admin_key)


ProjectReadDep = Annotated[Read[Project], Depends(project_read)]
AdminReadDep = Annotated[Read[ApiKey], Depends(admin_read)]

"""Request-scoped dependencies: the database session (the only place that commits) and the caller.

A key is looked up by its sha256 (models/project.py), never compared with a stored key. Its scope decides
what it reaches: a project key its own project's resources (`ProjectDep`), an admin key the key management
routes (`AdminDep`); each gets 403 on the other's routes. A request that repeats the Authorization header
gets 400 and no key is checked. A key found valid is noted in `api.limits.verified_keys`, so that the rate
limits count its next requests per key rather than per address.

JSON reads (the GET routes that answer from the database: objects, lists, events) take `ProjectReadDep` or
`AdminReadDep` instead: the route is `async` and awaits `read(lambda session, project: ...)`, which opens a
read-only autocommit session (models/db.py, `get_read_sessionmaker`), checks the key, runs the read and
serializes the answer in ONE thread-pool call. Each sync dependency and a sync route is a hand-off between
the event loop and the thread pool, and each BEGIN, COMMIT and ping a round trip to the database; on status
polling those, not the queries, were the cost (docs/RELIABILITY.md, Load). The checks and their errors are
the same as with `SessionDep` + `ProjectDep`; a missing key is still refused before the route's parameters
are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Generic, NamedTuple, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Depends, Request, Response
from pydantic import BaseModel
from sqlalchemy import bindparam, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from api.limits import verified_keys
from models.config import get_settings
from models.db import get_read_sessionmaker, session_scope
from models.errors import InvalidRequest, PermissionDenied, Unauthorized
from models.project import ADMIN_SCOPE, PROJECT_SCOPE, ApiKey, Project, hash_key


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


# "function" scope: commit before the response goes out, so a 2xx means the change is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def bearer_key(request: Request) -> str:
    presented = request.headers.getlist("authorization")
    if len(presented) > 1:
        # Which one counts would be a guess, and not the same guess everywhere: the rate limits read the last,
        # this the first, so a valid key sent after a wrong one would spare the wrong one the throttle on failed
        # authentication (api/limits.py). RFC 6750 makes a repeated credential a 400.
        raise InvalidRequest(
            f"Send one Authorization header; this request has {len(presented)}.", param="authorization"
        )
    header = presented[0] if presented else ""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key. Send 'Authorization: Bearer <key>'.")
    return key.strip()


class Caller(NamedTuple):
    """Who sent the request: the key's id and scope, and its project (None for an admin key)."""

    key_id: str
    scope: str
    project: Project | None


# Built once: the statement and its cache key are not rebuilt on every request.
_KEY_LOOKUP = (
    select(ApiKey.id, ApiKey.scope, Project.id, Project.name, Project.created_at)
    .outerjoin(Project, Project.id == ApiKey.project_id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)


def presented_key_hash(request: Request) -> str:
    """The sha256 of the request's key (401 when it has none), as keys are stored and counted."""
    return hash_key(bearer_key(request))


def _caller(request: Request, session: Session) -> Caller:
    key_hash = presented_key_hash(request)
    found = session.execute(_KEY_LOOKUP, {"key_hash": key_hash}).first()
    if found is None:
        verified_keys.discard(key_hash)
        raise Unauthorized("Incorrect API key provided.")
    verified_keys.add(key_hash)  # which rate-limit counter its next requests go to (api/limits.py)
    key_id, scope, project_id, name, created_at = found
    # The project as a plain (untracked) copy of its row: services read its id. Loading the key and the
    # project as ORM entities took about three times as long as this one row (measured in-process).
    project = Project(id=project_id, name=name, created_at=created_at) if project_id else None
    return Caller(key_id, scope, project)


def get_project(request: Request, session: SessionDep) -> Project:
    caller = _caller(request, session)
    if caller.scope != PROJECT_SCOPE or caller.project is None:
        raise PermissionDenied(
            "This is an admin key: it manages API keys (/v1/admin/keys) and nothing else. "
            "Use a project key for files, jobs and the other resources."
        )
    return caller.project


def get_admin_key(request: Request, session: SessionDep) -> Caller:
    caller = _caller(request, session)
    if caller.scope != ADMIN_SCOPE:
        raise PermissionDenied(
            "Managing API keys needs an admin key (grove keys create --admin); this key belongs to a project."
        )
    return caller


def get_caller(request: Request, session: SessionDep) -> Caller:
    """Any valid key, project or admin: for the few routes both reach (checkpoint permissions), which decide
    what each may do from `Caller.project`."""
    return _caller(request, session)


ProjectDep = Annotated[Project, Depends(get_project)]
AdminDep = Annotated[Caller, Depends(get_admin_key)]
CallerDep = Annotated[Caller, Depends(get_caller)]


T = TypeVar("T")
C = TypeVar("C")


def read_limiter() -> CapacityLimiter:
    """The threads reads run on (GROVE_API_READ_THREADS), apart from the sync routes' pool (anyio's default,
    40 threads): a few threads keep the cores busy; dozens only take turns at the GIL and stretch every
    read's latency. Made by the app's lifespan, on the loop that uses it (api/app.py)."""
    return CapacityLimiter(get_settings().api_read_threads)


class Read(Generic[C]):
    """A read in one thread-pool call: `await read(fn)` answers fn(session, caller).

    A pydantic answer is rendered here by pydantic-core (the route's response_model still documents it):
    FastAPI would validate it against that model again and encode it twice, on the event loop. Anything
    else (a streaming response) is returned as it is.
    """

    def __init__(self, request: Request, caller: Callable[[Request, Session], C]):
        self.request = request
        self.caller = caller

    async def __call__(self, fn: Callable[[Session, C], T]) -> T | Response:
        state = self.request.app.state
        limiter = getattr(state, "read_limiter", None)
        if limiter is None:  # an app run without its lifespan (a TestClient used outside `with`)
            limiter = state.read_limiter = read_limiter()
        return await anyio.to_thread.run_sync(self._run, fn, limiter=limiter)

    def _run(self, fn: Callable[[Session, C], T]) -> T | Response:
        try:
            answer = self._read(fn)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            # A pooled connection the database dropped (a restart): SQLAlchemy has discarded the pool's
            # connections; a read is safe to run again on a new one. Down for good: this one raises (503).
            answer = self._read(fn)
        if isinstance(answer, BaseModel):
            return Response(answer.model_dump_json(by_alias=True), media_type="application/json")
        return answer

    def _read(self, fn: Callable[[Session, C], T]) -> T:
        with get_read_sessionmaker()() as session:
            return fn(session, self.caller(self.request, session))


# async: resolved on the event loop, no thread hop (and no I/O: the key is checked inside the read).
async def project_read(request: Request) -> Read[Project]:
    bearer_key(request)  # a missing key is a 401 before the route's parameters, as with ProjectDep
    return Read(request, get_project)


async def admin_read(request: Request) -> Read[Caller]:
    bearer_key(request)
    return Read(request, get_admin_key)


async def caller_read(request: Request) -> Read[Caller]:
    bearer_key(request)
    return Read(request, _caller)


ProjectReadDep = Annotated[Read[Project], Depends(project_read)]
AdminReadDep = Annotated[Read[Caller], Depends(admin_read)]
CallerReadDep = Annotated[Read[Caller], Depends(caller_read)]

"""Engine and sessions. Services never commit: the caller that opened the session does.

Every engine hides bound parameters: a failed statement's error reaches logs and error reports, and its
values may be a webhook signing secret, a key hash or a tenant's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

import models.tables  # noqa: F401  (every table mapped before a session resolves foreign keys)
from models.config import get_settings


def _prepare_sqlite_dir(url: str) -> None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if database and database != ":memory:":
        from pathlib import Path

        Path(database).parent.mkdir(parents=True, exist_ok=True)


def build_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        _prepare_sqlite_dir(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            # WAL lets the API read while the worker writes; the busy timeout waits out short locks.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


# SQLSTATEs of a server that went away or is not taking connections yet: connection exceptions (class 08),
# admin_shutdown, crash_shutdown, cannot_connect_now. A query cancelled by a timeout (57014) is not one of them.
_UNREACHABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def database_unreachable(exc: BaseException) -> bool:
    """The database was down or dropped the connection: worth waiting out, unlike a bad statement."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    sqlite_error = getattr(exc.orig, "sqlite_errorname", None)
    if sqlite_error is not None:  # SQLite's OperationalError also means "no such table": only a lock is passing
        return sqlite_error in ("SQLITE_BUSY", "SQLITE_LOCKED")
    sqlstate = getattr(exc.orig, "sqlstate", None)
    # psycopg gives a failed connect no SQLSTATE: the server never answered.
    return sqlstate is None or sqlstate.startswith(_UNREACHABLE_SQLSTATES)


@lru_cache
def get_engine() -> Engine:
    return build_engine(get_settings().database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def build_read_engine(url: str) -> Engine:
    """PostgreSQL connections for the API's JSON reads: autocommit, read-only, no ping on checkout.

    A status poll is one or two SELECTs. On the main engine each also paid a ping, a BEGIN and a COMMIT:
    five round trips of which three carried nothing, the larger part of the request's cost
    (docs/RELIABILITY.md, Load). Here every statement is its own read-only transaction, so a read never
    holds a transaction open and cannot write by mistake (PostgreSQL refuses it). Without the ping a
    connection broken by a database restart fails once; `api.deps.Read` then retries on a fresh one.
    """
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        # The name tells these connections apart in pg_stat_activity.
        connect_args={"options": "-c default_transaction_read_only=on", "application_name": "grove-api-read"},
        pool_size=10,
        max_overflow=20,
        hide_parameters=True,
    )


@lru_cache
def get_read_sessionmaker() -> sessionmaker[Session]:
    url = get_settings().database_url
    if url.startswith("sqlite"):  # the embedded deployment: one file, the main engine is as cheap
        return get_sessionmaker()
    return sessionmaker(build_read_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | None = None) -> Iterator[Session]:
    """One unit of work for the worker and scripts: commit on success, roll back on error. `bind` picks another
    database than the configured one (the tests' stacks each have their own)."""
    session = Session(bind, expire_on_commit=False) if bind is not None else get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()

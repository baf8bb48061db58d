"""The database goes away under a running job: the worker waits for it and gives the job back, never fails it.

Every error here is a real one from a real database: a refused connect, a backend terminated the way a
restart terminates it, a statement timeout, a locked SQLite file.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError

from models.db import database_unreachable, get_engine, session_scope
from models.job import Job, JobEvent
from models.job_status import JobStatus
from tests.conftest import free_port
from worker import tasks
from worker.lease import claim


def _error_of(engine, *statements: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
        for statement in statements:
            connection.execute(text(statement))
    return caught.value


def _terminated_connection_error() -> DBAPIError:
    """What a worker's open connection raises when PostgreSQL shuts down (AdminShutdown, 57P01)."""
    with pytest.raises(DBAPIError) as caught, session_scope() as session:
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    return caught.value


def test_a_refused_connect_is_unreachable():
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    assert database_unreachable(_error_of(engine, "SELECT 1"))


def test_a_connection_the_server_terminated_is_unreachable():
    assert database_unreachable(_terminated_connection_error())


def test_statement_errors_are_not_unreachable():
    engine = get_engine()
    assert not database_unreachable(_error_of(engine, "SELEKT 1"))
    # A statement timeout is an OperationalError too (57014), but waiting would not make it pass.
    assert not database_unreachable(_error_of(engine, "SET statement_timeout = 10", "SELECT pg_sleep(1)"))
    assert not database_unreachable(ValueError("not a database error"))


def test_sqlite_lock_is_passing_and_a_missing_table_is_not(tmp_path):
    path = tmp_path / "grove.db"
    holder = sqlite3.connect(path)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        assert database_unreachable(_error_of(engine, "SELECT * FROM t"))
        holder.rollback()
        assert not database_unreachable(_error_of(engine, "SELECT * FROM missing"))
    finally:
        holder.close()
        engine.dispose()


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def _last_event(job_id: str) -> JobEvent:
    with session_scope() as session:
        return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())).first()


def test_a_stage_that_loses_the_database_gives_the_job_back(job_id, queue, monkeypatch):
    def stage_whose_connection_drops(_job_id, _lease):
        # The stage's own connection is terminated by the server mid-stage, as in a database restart.
        with session_scope() as session:
            session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    monkeypatch.setitem(tasks.STAGES, "fine_tune", stage_whose_connection_drops)
    before = queue()
    assert tasks.run_job(job_id, "fine_tune") == "requeued"
    job = _job(job_id)
    # Queued again, its lease released, republished, and the attempt not counted against max_attempts.
    assert job.status == JobStatus.queued and job.lease_owner is None
    assert job.attempts == 0 and job.error is None
    assert queue() == before + 1 and job.dispatched_at is not None
    assert "lost its database connection" in _last_event(job_id).message
    # The next delivery claims and runs it as usual.
    assert claim(job_id) is not None and _job(job_id).attempts == 1


def test_a_cancelling_job_is_cancelled_when_given_back(job_id, client, auth):
    lease = claim(job_id)
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["status_detail"] == "cancelling"
    assert tasks.give_back(job_id, lease) == "cancelled"
    assert _job(job_id).status == JobStatus.cancelled


def test_a_worker_that_lost_its_lease_gives_nothing_back(job_id):
    stale = claim(job_id)
    with session_scope() as session:
        session.get(Job, job_id).lease_owner = "another-worker"
    assert tasks.give_back(job_id, stale) == "lease_lost"
    job = _job(job_id)
    assert job.status == JobStatus.running and job.lease_owner == "another-worker" and job.attempts == 1

import uuid

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.job import Job, JobEvent
from models.job_status import ALLOWED_TRANSITIONS, TERMINAL, JobStatus
from models.project import Project
from models.transitions import switch_job_status


@pytest.fixture
def job_id(database) -> str:
    with session_scope() as session:
        # id(session) is reused once a session is freed, and the database outlives each test.
        project = Project(name=f"transitions-{uuid.uuid4().hex}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="tiny-llama-test", queue="unused", spec={}, status=JobStatus.queued)
        session.add(job)
        session.flush()
        return job.id


def status_and_events(job_id):
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        events = session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        return status, list(events)


def test_terminal_states_are_final():
    assert all(not ALLOWED_TRANSITIONS[state] for state in TERMINAL)
    assert all(state.is_terminal for state in TERMINAL)


def test_claim_stamps_lease_and_second_claim_loses(job_id):
    with session_scope() as session:
        assert switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
    with session_scope() as session:
        assert not switch_job_status(session, job_id, JobStatus.running, lease_owner="b", lease_seconds=60)
        job = session.get(Job, job_id)
        assert job.lease_owner == "a" and job.started_at is not None and job.attempts == 1
    assert status_and_events(job_id) == (JobStatus.running, ["started"])


def test_only_the_lease_holder_can_finish(job_id):
    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
    with session_scope() as session:
        assert not switch_job_status(session, job_id, JobStatus.succeeded, lease_owner="b")
        assert switch_job_status(session, job_id, JobStatus.succeeded, lease_owner="a")
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.finished_at is not None and job.lease_owner is None
    # Nothing leaves a terminal state, whoever asks.
    for target in JobStatus:
        with session_scope() as session:
            assert not switch_job_status(session, job_id, target, lease_owner="a", lease_seconds=1)
    assert status_and_events(job_id) == (JobStatus.succeeded, ["started", "succeeded"])


def test_cancel_and_finish_race_has_one_winner(job_id):
    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
    with session_scope() as session:
        assert switch_job_status(session, job_id, JobStatus.cancelling, only_from={JobStatus.running})
    with session_scope() as session:
        # The worker finishing now cannot report success over a cancel.
        assert not switch_job_status(
            session, job_id, JobStatus.succeeded, only_from={JobStatus.running}, lease_owner="a"
        )
        assert switch_job_status(session, job_id, JobStatus.cancelled, lease_owner="a")
    assert status_and_events(job_id) == (JobStatus.cancelled, ["started", "cancelling", "cancelled"])


def test_failure_records_error(job_id):
    error = {"code": "invalid_file", "message": "line 3: bad", "param": "training_file", "type": "user_error"}
    with session_scope() as session:
        assert switch_job_status(session, job_id, JobStatus.failed, error=error)
    with session_scope() as session:
        assert session.get(Job, job_id).error == error

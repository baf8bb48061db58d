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


def test_pause_of_a_queued_job_is_at_once_and_a_worker_cannot_claim_it(job_id):
    from jobs.lifecycle import pause

    with session_scope() as session:
        assert pause(session, session.get(Job, job_id)).status == JobStatus.paused
    with session_scope() as session:
        # The message still in the broker finds it paused: the claim loses.
        assert not switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
        # Again: unchanged, no second event.
        assert pause(session, session.get(Job, job_id)).status == JobStatus.paused
    assert status_and_events(job_id) == (JobStatus.paused, ["paused"])


def test_pause_of_a_running_job_waits_for_its_worker_and_frees_it(job_id):
    from jobs.lifecycle import pause, resume

    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
    with session_scope() as session:
        assert pause(session, session.get(Job, job_id)).status == JobStatus.pausing
    with session_scope() as session:
        assert pause(session, session.get(Job, job_id)).status == JobStatus.pausing  # idempotent
        # Only the worker holding the lease confirms; it gives back the attempt its claim counted.
        assert not switch_job_status(session, job_id, JobStatus.paused, lease_owner="b", refund_attempt=True)
        assert switch_job_status(session, job_id, JobStatus.paused, lease_owner="a", refund_attempt=True)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert (job.lease_owner, job.lease_expires_at, job.attempts, job.finished_at) == (None, None, 0, None)
        assert resume(session, job).status == JobStatus.queued
    with session_scope() as session:
        assert switch_job_status(session, job_id, JobStatus.running, lease_owner="c", lease_seconds=60)
        assert session.get(Job, job_id).attempts == 1
    assert status_and_events(job_id) == (
        JobStatus.running,
        ["started", "pausing", "paused", "queued", "started"],
    )


def test_a_finish_beats_a_pause_asked_after_the_last_step(job_id):
    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
        switch_job_status(session, job_id, JobStatus.pausing, only_from={JobStatus.running})
    with session_scope() as session:
        assert switch_job_status(
            session, job_id, JobStatus.succeeded, only_from={JobStatus.running, JobStatus.pausing}, lease_owner="a"
        )
    assert status_and_events(job_id) == (JobStatus.succeeded, ["started", "pausing", "succeeded"])


def test_cancel_of_a_paused_or_pausing_job(job_id):
    from jobs.lifecycle import cancel, pause

    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="a", lease_seconds=60)
        pause(session, session.get(Job, job_id))
    with session_scope() as session:
        # Pausing: the worker is asked to stop, as for a running job.
        assert cancel(session, session.get(Job, job_id)).status == JobStatus.cancelling
        assert not switch_job_status(session, job_id, JobStatus.paused, lease_owner="a", refund_attempt=True)
        assert switch_job_status(session, job_id, JobStatus.cancelled, lease_owner="a")
    assert status_and_events(job_id) == (JobStatus.cancelled, ["started", "pausing", "cancelling", "cancelled"])


def test_cancel_of_a_paused_job_is_at_once(job_id):
    from jobs.lifecycle import cancel, pause

    with session_scope() as session:
        pause(session, session.get(Job, job_id))
    with session_scope() as session:
        job = cancel(session, session.get(Job, job_id))
        assert job.status == JobStatus.cancelled and job.finished_at is not None
    assert status_and_events(job_id) == (JobStatus.cancelled, ["paused", "cancelled"])


@pytest.mark.parametrize("status", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.cancelling])
def test_pause_and_resume_refuse_with_409_naming_the_job(job_id, status):
    from jobs.lifecycle import pause, resume
    from models.errors import Conflict

    with session_scope() as session:
        session.get(Job, job_id).status = status
    with session_scope() as session:
        job = session.get(Job, job_id)
        with pytest.raises(Conflict, match=f"Job {job_id} .*cannot be paused") as paused:
            pause(session, job)
        with pytest.raises(Conflict, match=f"Job {job_id} .*not paused; only a paused job can be resumed") as resumed:
            resume(session, job)
    assert paused.value.status_code == resumed.value.status_code == 409
    assert paused.value.param == "fine_tuning_job_id"


def test_resume_of_a_queued_job_is_409(job_id):
    from jobs.lifecycle import resume
    from models.errors import Conflict

    with session_scope() as session, pytest.raises(Conflict, match="is queued, not paused"):
        resume(session, session.get(Job, job_id))

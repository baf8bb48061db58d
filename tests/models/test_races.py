"""Racing writers end in one consistent state with one event each (PostgreSQL, real threads)."""

import threading
import uuid

import pytest
from sqlalchemy import select

from models.db import session_scope
from models.job import Job, JobEvent
from models.job_status import JobStatus
from models.project import Project
from models.transitions import switch_job_status


def make_job(status: JobStatus) -> str:
    with session_scope() as session:
        project = Project(name=f"race-{uuid.uuid4().hex}")
        session.add(project)
        session.flush()
        job = Job(project_id=project.id, model="m", queue="q", spec={}, status=status)
        session.add(job)
        session.flush()
        return job.id


def race(*actions) -> list:
    barrier = threading.Barrier(len(actions))
    results = [None] * len(actions)

    def run(i, action):
        barrier.wait()
        with session_scope() as session:
            results[i] = action(session)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def final(job_id):
    with session_scope() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        events = list(session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id)))
    return status, events


@pytest.mark.parametrize("round_", range(10))
def test_cancel_and_claim(database, round_):
    job_id = make_job(JobStatus.queued)
    claimed, cancelled = race(
        lambda s: switch_job_status(s, job_id, JobStatus.running, lease_owner="w", lease_seconds=60),
        lambda s: switch_job_status(s, job_id, JobStatus.cancelled, only_from={JobStatus.queued}),
    )
    status, events = final(job_id)
    assert claimed != cancelled  # exactly one won
    assert status == (JobStatus.running if claimed else JobStatus.cancelled)
    assert sorted(events) == (["started"] if claimed else ["cancelled"])


@pytest.mark.parametrize("round_", range(10))
def test_cancel_and_finish(database, round_):
    job_id = make_job(JobStatus.queued)
    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.running, lease_owner="w", lease_seconds=60)
    finished, cancelling = race(
        lambda s: switch_job_status(s, job_id, JobStatus.succeeded, only_from={JobStatus.running}, lease_owner="w"),
        lambda s: switch_job_status(s, job_id, JobStatus.cancelling, only_from={JobStatus.running}),
    )
    status, events = final(job_id)
    assert finished != cancelling
    assert status == (JobStatus.succeeded if finished else JobStatus.cancelling)
    assert sorted(events) == sorted(["started", "succeeded" if finished else "cancelling"])

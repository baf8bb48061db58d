"""Dispatch without loss or duplication: after-commit publish, the reconciler, and idempotent claims.

The reconciler's tests take a database of their own (`own_database`), so that what a pass reports is what it
did to their job alone.
"""

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from models.base import utcnow
from models.config import get_settings
from models.db import session_scope
from models.job import Job, JobEvent
from models.job_status import JobStatus
from models.transitions import switch_job_status
from tests.api.test_files import jsonl, upload
from tests.conftest import prompt_completion_rows
from worker.lease import claim
from worker.reconcile import reconcile_once


def events(job_id) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_message_goes_out_after_commit(client, auth, queue):
    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    before = queue()
    job = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": file_id}
    ).json()
    assert queue() == before + 1
    with session_scope() as session:
        assert session.get(Job, job["id"]).dispatched_at is not None


def test_rolled_back_job_sends_nothing(queue, job_id):
    from models.queue import dispatch_after_commit

    before = queue()
    with pytest.raises(RuntimeError), session_scope() as session:
        dispatch_after_commit(session, job_id, "fine_tune", get_settings().fine_tune_queue)
        raise RuntimeError("request failed after creating the job")
    assert queue() == before


def test_second_delivery_of_a_claimed_job_does_nothing(job_id):
    from worker.tasks import run_fine_tune

    lease = claim(job_id)
    assert lease is not None
    before = events(job_id)
    assert run_fine_tune.run(job_id) == "skipped"  # the task body, as a redelivered message runs it
    assert events(job_id) == before
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.running and job.lease_owner == lease.owner and job.attempts == 1


def test_finished_job_is_never_run_again(job_id):
    from worker.tasks import run_fine_tune

    with session_scope() as session:
        switch_job_status(session, job_id, JobStatus.cancelled)
    assert run_fine_tune.run(job_id) == "skipped"
    assert events(job_id)[-1] == "cancelled"


NOTHING_DONE = {
    "requeued": 0,
    "failed": 0,
    "cancelled": 0,
    "paused": 0,
    "republished": 0,
    "sweeps": 0,
    "temp_files": 0,
    "expired_uploads": 0,
}


@pytest.mark.usefixtures("own_database")
def test_reconciler_republishes_lost_messages(queue, job_id):
    with session_scope() as session:
        # As if the publish after commit failed (broker down), some time ago.
        session.execute(
            update(Job).where(Job.id == job_id).values(dispatched_at=None, created_at=utcnow() - timedelta(minutes=1))
        )
    before = queue()
    assert reconcile_once() == NOTHING_DONE | {"republished": 1}
    assert queue() == before + 1
    with session_scope() as session:
        assert session.get(Job, job_id).dispatched_at is not None
    # A fresh dispatch is left alone.
    again = queue()
    assert reconcile_once() == NOTHING_DONE
    assert queue() == again


@pytest.mark.usefixtures("own_database")
def test_reconciler_requeues_a_job_whose_worker_died(queue, job_id):
    lease = claim(job_id)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1), created_at=utcnow() - timedelta(minutes=1))
        )
    before = queue()
    # The pass requeues the job and, in the same pass, publishes it again.
    assert reconcile_once() == NOTHING_DONE | {"requeued": 1, "republished": 1}
    assert queue() == before + 1
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.queued and job.lease_owner is None and job.dispatched_at is not None
    assert events(job_id)[-2:] == ["started", "queued"]
    # The dead worker's lease is gone: it can no longer write.
    lease.beat()
    assert lease.lost.is_set()
    # A new claim gets it, as a second attempt.
    second = claim(job_id)
    assert second is not None and second.owner != lease.owner
    with session_scope() as session:
        assert session.get(Job, job_id).attempts == 2


def test_heartbeat_sees_cancel(job_id, client, auth):
    lease = claim(job_id)
    lease.beat()
    assert not lease.should_stop
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["status_detail"] == "cancelling"
    lease.beat()
    assert lease.cancel_requested.is_set() and lease.should_stop


def test_heartbeat_sees_pause_and_it_is_no_stop(job_id, client, auth):
    lease = claim(job_id)
    lease.beat()
    response = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)
    # OpenAI's enum has no `pausing`: shown running until the worker lets go; the event says pausing.
    assert response.status_code == 200 and response.json()["status"] == "running"
    assert events(job_id)[-1] == "pausing"
    lease.beat()
    assert lease.pause_requested.is_set() and not lease.should_stop
    # The worker checkpointed and lets go: paused, no lease, the attempt given back.
    from worker.stage_kit import confirm_paused

    assert confirm_paused(job_id, lease, 3)
    lease.beat()
    assert lease.lost.is_set()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "paused"
    with session_scope() as session:
        row = session.get(Job, job_id)
        assert (row.lease_owner, row.attempts) == (None, 0)


def test_resume_publishes_the_job_again(job_id, client, auth, queue):
    before = queue()
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    assert claim(job_id) is None  # the message already sent finds it paused
    resumed = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    assert queue() == before + 1
    again = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=auth)
    assert again.status_code == 409
    error = again.json()["error"]
    assert job_id in error["message"] and "not paused" in error["message"]
    assert error["param"] == "fine_tuning_job_id"
    assert claim(job_id) is not None


@pytest.mark.usefixtures("own_database")
def test_reconciler_leaves_a_paused_job_alone(queue, job_id, client, auth):
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth).json()["status"] == "paused"
    with session_scope() as session:
        # Long ago and never dispatched, as a lost queued job would be: still not republished.
        session.execute(
            update(Job).where(Job.id == job_id).values(dispatched_at=None, created_at=utcnow() - timedelta(hours=1))
        )
    before = queue()
    assert reconcile_once() == NOTHING_DONE
    assert queue() == before
    with session_scope() as session:
        assert session.get(Job, job_id).status == JobStatus.paused


@pytest.mark.usefixtures("own_database")
def test_reconciler_pauses_a_pausing_job_whose_worker_died(queue, job_id, client, auth):
    claim(job_id)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=auth)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    before = queue()
    assert reconcile_once() == NOTHING_DONE | {"paused": 1}
    assert queue() == before
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.paused and job.lease_owner is None
    assert events(job_id)[-2:] == ["pausing", "paused"]


def test_reconciler_removes_temp_files_abandoned_by_a_crash(client, tmp_path, monkeypatch):
    import os
    import time

    from models.storage import LocalStorage

    # A store of this test's own, so that the count is of this abandoned file alone.
    storage = LocalStorage(tmp_path / "storage")
    monkeypatch.setattr("worker.reconcile.get_storage", lambda: storage)
    tmp = storage.tmp
    tmp.mkdir(parents=True, exist_ok=True)
    abandoned, fresh = tmp / "upload-abandoned", tmp / "upload-in-flight"
    abandoned.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    assert reconcile_once()["temp_files"] == 1
    assert not abandoned.exists() and fresh.exists()
    fresh.unlink()

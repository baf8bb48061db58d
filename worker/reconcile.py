"""The reconciler: no job is lost when a message or a worker is.

- A queued job whose message never went out (publish failed after commit), or went out long ago and
  was never claimed (broker restarted and lost it), is published again. The claim is conditional,
  so an extra message is harmless.
- A running job whose lease expired (its worker died) goes back to queued and is published again,
  unless its workers died `max_attempts` times: such a job (one that runs its worker out of memory,
  say) fails with `worker_lost`. A cancelling one whose worker died is simply cancelled, and a pausing one
  paused (a resume continues from its last regular checkpoint). A paused job holds no lease and no message: the
  reconciler leaves it alone until it is resumed.
- Sweeps hold no worker and are never published: each pass advances them (worker/sweep.py).
- A multipart upload past its expires_at and never completed expires, and its parts' bytes are deleted.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select

from models.base import utcnow
from models.config import get_settings
from models.db import session_scope
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.queue import publish_job
from models.storage import get_storage
from models.transitions import switch_job_status
from models.upload import expire_uploads
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)


def reconcile_once() -> dict[str, int]:
    settings = get_settings()
    now = utcnow()
    counts = {
        "requeued": 0,
        "failed": 0,
        "cancelled": 0,
        "paused": 0,
        "republished": 0,
        "sweeps": 0,
        "temp_files": 0,
        "expired_uploads": 0,
    }
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.step).where(
                Job.status.in_([JobStatus.running, JobStatus.cancelling, JobStatus.pausing]),
                Job.lease_expires_at < now,
                Job.kind != JobKind.sweep,
            )
        ).all()
        for job_id, status, attempts, step in expired:
            count, to, change = _after_lease_expired(status, attempts, step, settings.max_attempts)
            if switch_job_status(session, job_id, to, **change):
                counts[count] += 1

    # Sweeps: report their trials to optuna, prune, start new trials (dispatched after commit), finish.
    from worker.sweep import advance_sweeps

    counts["sweeps"] = advance_sweeps()

    stale = now - timedelta(seconds=settings.redispatch_after_seconds)
    # A message published less than a few seconds ago may simply not be claimed yet.
    grace = now - timedelta(seconds=5)
    with session_scope() as session:
        to_publish = session.execute(
            select(Job.id, Job.kind, Job.queue)
            .where(
                Job.status == JobStatus.queued,
                Job.kind != JobKind.sweep,
                Job.created_at < grace,
                or_(Job.dispatched_at.is_(None), Job.dispatched_at < stale),
            )
            .order_by(Job.id)
            .limit(500)
        ).all()
    for job_id, kind, queue in to_publish:
        try:
            publish_job(job_id, kind, queue)
            counts["republished"] += 1
        except Exception:
            log.exception("re-publishing %s failed; will retry", job_id)
            break
    # Multipart uploads never completed: expired, their parts' bytes deleted once that has committed.
    with session_scope() as session:
        counts["expired_uploads"] = expire_uploads(session)
    # Staged uploads and artifacts of a process killed mid-write (an hour old: none still being written).
    try:
        counts["temp_files"] = get_storage().sweep_temp()
    except OSError:
        log.exception("removing abandoned temp files failed; will retry")
    if any(counts.values()):
        log.info("reconciler: %s", counts)
    return counts


def _after_lease_expired(
    status: JobStatus, attempts: int, step: int | None, max_attempts: int
) -> tuple[str, JobStatus, dict]:
    """What becomes of a job whose worker's lease expired: (the count it adds to, its new status, the switch's
    conditions and message)."""
    if status == JobStatus.cancelling:
        message = "Job cancelled; its worker stopped before confirming."
        return "cancelled", JobStatus.cancelled, {"only_from": {JobStatus.cancelling}, "message": message}
    if status == JobStatus.pausing:
        message = "Job paused; its worker stopped before confirming, so it resumes from its last checkpoint."
        return "paused", JobStatus.paused, {"only_from": {JobStatus.pausing}, "message": message}
    if attempts >= max_attempts:
        return "failed", JobStatus.failed, {"only_from": {JobStatus.running}, "error": worker_lost(attempts, step)}
    message = "Worker lease expired; job requeued."
    return "requeued", JobStatus.queued, {"only_from": {JobStatus.running}, "message": message}


def worker_lost(attempts: int, step: int | None) -> dict:
    return {
        "code": "worker_lost",
        "message": f"The job's worker died {attempts} times while running it (the last time at step {step or 0}). "
        "The usual cause is running out of memory: lower batch_size or max_seq_len, or give the worker more memory.",
        "param": None,
        "type": "system_error",
    }


class ReconcilerThread(PeriodicThread):
    """Runs the reconciler periodically inside a long-lived process (the API, or `grove reconcile`)."""

    def __init__(self, interval: float | None = None):
        super().__init__("reconciler", interval or get_settings().reconcile_interval_seconds, reconcile_once)

"""Thin Celery tasks: claim the job, run its stage, record how it ended.

A task receives only the job id and is idempotent: a second delivery finds the job already claimed
(or finished) and returns without doing anything.
"""

from __future__ import annotations

import logging
import time
import traceback

from models.db import database_unreachable, session_scope
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.queue import TASK_FOR_KIND, dispatch_after_commit, get_celery
from worker import evaluate, export, fine_tune
from worker.lease import Lease, claim
from worker.stage_kit import classify_failure, confirm_cancelled, fail, switch_under_lease
from worker.workspace import remove_finished_work_dirs

log = logging.getLogger(__name__)
app = get_celery()

STAGES = {JobKind.fine_tune: fine_tune.run, JobKind.export: export.run, JobKind.evaluation: evaluate.run}


def run_job(job_id: str, kind: str) -> str:
    try:
        remove_finished_work_dirs()
    except Exception:
        log.exception("cleaning finished jobs' work directories failed; going on")
    lease = claim(job_id)
    if lease is None:
        log.info("job %s is not queued (already claimed, finished or cancelled); skipping", job_id)
        return "skipped"
    lease.start()
    try:
        STAGES[kind](job_id, lease)
        return "done"
    except Exception as exc:
        if database_unreachable(exc):
            # Not the job's fault, and no write can record a failure now: wait for the database and give
            # the job back, to resume from its last checkpoint (issue 6: a database restart loses no job).
            log.warning("job %s lost the database (%s); giving it back once it answers", job_id, exc)
            return give_back(job_id, lease)
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        fail(job_id, lease, classify_failure(exc))
        return "failed"
    finally:
        lease.stop()


def give_back(job_id: str, lease: Lease, poll_seconds: float = 1.0) -> str:
    """running -> queued (republished, its attempt refunded), or cancelling -> cancelled, once the database answers.

    The wait is bounded by the lease: past it the lease has lapsed, and the reconciler requeues the job when the
    database returns (that counts as an attempt, as for a worker that died).
    """
    deadline = time.monotonic() + lease.lease_seconds
    while True:
        try:
            with session_scope() as session:
                if switch_under_lease(
                    session,
                    job_id,
                    lease,
                    JobStatus.queued,
                    only_from={JobStatus.running},
                    refund_attempt=True,
                    message="The worker lost its database connection; job requeued to resume from its last checkpoint.",
                ):
                    job = session.get(Job, job_id)
                    dispatch_after_commit(session, job_id, job.kind, job.queue)
                    return "requeued"
            if confirm_cancelled(job_id, lease, "Job cancelled; its worker lost the database while stopping."):
                return "cancelled"
            return "lease_lost"
        except Exception as exc:
            if not database_unreachable(exc) or time.monotonic() > deadline:
                log.exception("giving job %s back failed; the reconciler requeues it when its lease expires", job_id)
                return "abandoned"
        time.sleep(poll_seconds)


@app.task(name=TASK_FOR_KIND[JobKind.fine_tune], acks_late=True, reject_on_worker_lost=True)
def run_fine_tune(job_id: str) -> str:
    return run_job(job_id, JobKind.fine_tune)


@app.task(name=TASK_FOR_KIND[JobKind.export], acks_late=True, reject_on_worker_lost=True)
def run_export(job_id: str) -> str:
    return run_job(job_id, JobKind.export)


@app.task(name=TASK_FOR_KIND[JobKind.evaluation], acks_late=True, reject_on_worker_lost=True)
def run_evaluation(job_id: str) -> str:
    return run_job(job_id, JobKind.evaluation)

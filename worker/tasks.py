"""Thin Celery tasks: claim the job, run its stage, record how it ended.

A task receives only the job id and is idempotent: a second delivery finds the job already claimed
(or finished) and returns without doing anything.
"""

from __future__ import annotations

import errno
import logging
import time
import traceback

from models.db import database_unreachable, session_scope
from models.errors import GroveError
from models.job import Job
from models.job_status import JobStatus
from models.queue import TASK_FOR_KIND, dispatch_after_commit, get_celery
from models.transitions import switch_job_status
from worker import evaluate, export, fine_tune
from worker.lease import Lease, claim, confirm_cancelled
from worker.workspace import remove_finished_work_dirs

log = logging.getLogger(__name__)
app = get_celery()

STAGES = {"fine_tune": fine_tune.run, "export": export.run, "evaluation": evaluate.run}


def classify_failure(exc: BaseException) -> dict:
    """The job's error: user errors (bad data, bad spec) are told apart from system errors."""
    if isinstance(exc, GroveError) and exc.status_code < 500:
        return {
            "code": exc.code or "invalid_request",
            "message": exc.message,
            "param": exc.param,
            "type": "user_error",
        }
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return {
            "code": "storage_full",
            "message": f"The worker ran out of disk space while writing {exc.filename or 'a file'}.",
            "param": None,
            "type": "system_error",
        }
    if _is_out_of_memory(exc):
        return {
            "code": "out_of_memory",
            "message": f"The worker ran out of memory: {exc}",
            "param": None,
            "type": "system_error",
        }
    return {
        "code": "internal_error",
        "message": f"{exc.__class__.__name__}: {exc}",
        "param": None,
        "type": "system_error",
    }


# How a failed allocation surfaces besides MemoryError: torch's CPU allocator and C++ kernels (std::bad_alloc) raise
# RuntimeError; a syscall whose kernel memory a cgroup limit refuses (mmap, open, a socket) raises OSError(ENOMEM).
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "bad_alloc")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or exc.__class__.__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)


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
        _fail(job_id, lease, classify_failure(exc))
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
                if switch_job_status(
                    session,
                    job_id,
                    JobStatus.queued,
                    only_from={JobStatus.running},
                    lease_owner=lease.owner,
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


def _fail(job_id: str, lease: Lease, error: dict) -> None:
    with session_scope() as session:
        switch_job_status(
            session,
            job_id,
            JobStatus.failed,
            only_from={JobStatus.running, JobStatus.cancelling},
            lease_owner=lease.owner,
            error=error,
        )


@app.task(name=TASK_FOR_KIND["fine_tune"], acks_late=True, reject_on_worker_lost=True)
def run_fine_tune(job_id: str) -> str:
    return run_job(job_id, "fine_tune")


@app.task(name=TASK_FOR_KIND["export"], acks_late=True, reject_on_worker_lost=True)
def run_export(job_id: str) -> str:
    return run_job(job_id, "export")


@app.task(name=TASK_FOR_KIND["evaluation"], acks_late=True, reject_on_worker_lost=True)
def run_evaluation(job_id: str) -> str:
    return run_job(job_id, "evaluation")

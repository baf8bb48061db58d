"""The stage kit: what the worker's stages (fine_tune.py, export.py, evaluate.py) and their task runner share.

A stage runs under a held lease (worker/lease.py). Whatever it writes to its job goes through here and is
conditioned on that lease, so a worker that lost its job (the reconciler gave it to another) changes nothing:
- `load_job`, `project_file`: what a stage reads before it starts;
- `write_under_lease`: the one UPDATE of the job row a stage makes (progress, results);
- `StageProgress`: the base of each stage's progress reporter, with `Stopped` for a stage to stop where it is;
- how a stage ends: `finish` (running -> succeeded or failed in its final transaction), `fail`,
  `confirm_cancelled` (cancelling -> cancelled once it has stopped) and `confirm_paused` (pausing -> paused once
  it has checkpointed);
- `classify_failure`: the error a job that raised records, user errors told apart from system errors.
"""

from __future__ import annotations

import errno
from datetime import datetime, timedelta
from typing import TypeVar

from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.db import session_scope
from models.errors import GroveError
from models.file import File
from models.job import Checkpoint, Job
from models.job_status import JobStatus
from models.transitions import switch_job_status
from worker.lease import Lease

SpecT = TypeVar("SpecT", bound=BaseModel)


def load_job(session: Session, job_id: str, spec_type: type[SpecT]) -> tuple[Job, SpecT]:
    """The job, detached so that it can still be read once the session is gone, and its spec."""
    job = session.get(Job, job_id)
    session.expunge(job)
    return job, spec_type.model_validate(job.spec)


def project_file(session: Session, project_id: str, file_id: str) -> File | None:
    """A stored file of the job's project; None if it was deleted since the job was created."""
    return session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))


def adapter_file(session: Session, project_id: str, file_id: str, checkpoint_id: str | None) -> File | None:
    """An adapter archive the job reads: a file of its own project, or else the archive of the checkpoint its
    spec names, which may be another project's checkpoint shared with this one. The grant was checked when the
    job was created (jobs/checkpoints.py); a grant revoked since stops new jobs, not this one. Nothing else of
    the owner's is reachable: the file must be that checkpoint's own archive."""
    file = project_file(session, project_id, file_id)
    if file is None and checkpoint_id is not None:
        file = session.scalar(
            select(File)
            .join(Checkpoint, Checkpoint.file_id == File.id)
            .where(Checkpoint.id == checkpoint_id, File.id == file_id)
        )
    return file


def write_under_lease(session: Session, job_id: str, lease: Lease, **values) -> bool:
    """Write `values` to the job if `lease` still holds it; return whether it did.

    With no values nothing changes, but the lease is still checked and the row locked until commit, so what
    the transaction adds next (an event, a checkpoint) lands only under the lease.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == lease.owner)
        .values(**(values or {"step": Job.step}))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def switch_under_lease(
    session: Session, job_id: str, lease: Lease, to: JobStatus, *, only_from: set[JobStatus], **details
) -> bool:
    """A status change (models/transitions.py) that only the holder of `lease` can make."""
    return switch_job_status(session, job_id, to, only_from=only_from, lease_owner=lease.owner, **details)


def finish_at(seconds_left: float | None) -> datetime | None:
    """The estimated finish, `seconds_left` from now."""
    return utcnow() + timedelta(seconds=seconds_left) if seconds_left is not None else None


class Stopped(Exception):
    """A cancel was asked or the lease lost: the stage stops where it is."""


class StageProgress:
    """The base of a stage's progress reporter: it writes to its job only while this worker holds the lease."""

    def __init__(self, job_id: str, lease: Lease):
        self.job_id = job_id
        self.lease = lease

    def write(self, session: Session, **values) -> bool:
        return write_under_lease(session, self.job_id, self.lease, **values)

    def check_stop(self) -> None:
        """Raise Stopped once a cancel is asked or the lease is lost (the heartbeat sets both flags)."""
        if self.lease.should_stop:
            raise Stopped


# --- how a stage ends --------------------------------------------------------------------------


def finish(session: Session, job_id: str, lease: Lease, to: JobStatus, **details) -> bool:
    """running (or pausing: the last step came first) -> `to` in the stage's final transaction; return whether it
    moved.

    The result files, the job's pointers to them and the new status land together: if the switch loses (the
    lease was lost, or a cancel came first), the transaction is rolled back and nothing it published lands.
    """
    if switch_under_lease(session, job_id, lease, to, only_from={JobStatus.running, JobStatus.pausing}, **details):
        return True
    session.rollback()
    return False


def fail(job_id: str, lease: Lease, error: dict) -> None:
    """running, or cancelling or pausing (the stage raised before it stopped) -> failed."""
    with session_scope() as session:
        switch_under_lease(
            session,
            job_id,
            lease,
            JobStatus.failed,
            only_from={JobStatus.running, JobStatus.cancelling, JobStatus.pausing},
            error=error,
        )


def confirm_cancelled(job_id: str, lease: Lease, message: str, data: dict | None = None) -> bool:
    """cancelling -> cancelled, once the stage has stopped; only while this worker still holds the lease."""
    with session_scope() as session:
        return switch_under_lease(
            session, job_id, lease, JobStatus.cancelled, only_from={JobStatus.cancelling}, message=message, data=data
        )


def confirm_paused(job_id: str, lease: Lease, step: int) -> bool:
    """pausing -> paused once the stage has checkpointed at `step`: the lease is let go and the claim's attempt
    given back (a pause is not a worker lost); only while this worker still holds the lease."""
    with session_scope() as session:
        # The job's progress shows logged steps; a pause is often between two.
        write_under_lease(session, job_id, lease, step=step)
        return switch_under_lease(
            session,
            job_id,
            lease,
            JobStatus.paused,
            only_from={JobStatus.pausing},
            refund_attempt=True,
            message=f"Job paused after step {step}; resume it to continue from there.",
            data={"step": step},
        )


# --- failure codes -----------------------------------------------------------------------------


def system_error(code: str, message: str) -> dict:
    """The job's error for a failure that is not the user's."""
    return {"code": code, "message": message, "param": None, "type": "system_error"}


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
        return system_error(
            "storage_full", f"The worker ran out of disk space while writing {exc.filename or 'a file'}."
        )
    if _is_out_of_memory(exc):
        return system_error("out_of_memory", f"The worker ran out of memory: {exc}")
    return system_error("internal_error", f"{exc.__class__.__name__}: {exc}")


# How a failed allocation surfaces besides MemoryError: torch's CPU allocator and C++ kernels (std::bad_alloc) raise
# RuntimeError; a syscall whose kernel memory a cgroup limit refuses (mmap, open, a socket) raises OSError(ENOMEM).
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "out of memory", "bad_alloc")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or exc.__class__.__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)

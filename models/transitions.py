"""The one writer of job status.

Every status change goes through `switch_job_status`: a conditional UPDATE that only succeeds from an
allowed source state, so two racing writers (a cancel and a finish, two workers claiming) cannot both
win. The winner stamps the timestamps and writes exactly one event.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.job import Job, JobEvent
from models.job_status import JobStatus, sources_of
from models.webhook import record_job_outcome

# The event type written when a job enters each state.
EventLevel = Literal["info", "warn", "error"]

STATUS_EVENT = {
    JobStatus.validating_files: "created",
    JobStatus.queued: "queued",
    JobStatus.running: "started",
    JobStatus.cancelling: "cancelling",
    JobStatus.pausing: "pausing",
    JobStatus.paused: "paused",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}


def add_event(
    session: Session,
    job_id: str,
    type: str,
    message: str,
    data: dict | None = None,
    level: EventLevel = "info",
) -> JobEvent:
    """Record an event. `level` is OpenAI's enum for fine-tuning events (info, warn, error); `type` is ours."""
    event = JobEvent(job_id=job_id, type=type, message=message, data=data, level=level)
    session.add(event)
    return event


def switch_job_status(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    only_from: set[JobStatus] | None = None,
    lease_owner: str | None = None,
    lease_seconds: int | None = None,
    error: dict | None = None,
    message: str | None = None,
    data: dict | None = None,
    refund_attempt: bool = False,
) -> bool:
    """Move a job to `to` if it is in an allowed source state; return whether this call moved it.

    `only_from` narrows the sources. `lease_owner` for `running` claims the lease; for any other
    target it requires that the caller still holds the lease (a worker that lost it changes nothing).
    `refund_attempt` (back to `queued`, or `paused`) takes back the attempt its claim counted: the worker gave the
    job back alive (the database went away under it, or it paused), so it must not count toward `max_attempts`.
    """
    sources = set(sources_of(to))
    if only_from is not None:
        sources &= set(only_from)
    if not sources:
        return False
    now = utcnow()
    values: dict = {"status": to}
    conditions = [Job.id == job_id, Job.status.in_(sorted(sources))]

    if to == JobStatus.running:
        if lease_owner is None or lease_seconds is None:
            raise ValueError("claiming a job needs a lease owner and duration")
        values |= {
            "started_at": func.coalesce(Job.started_at, now),
            "lease_owner": lease_owner,
            "lease_expires_at": now + timedelta(seconds=lease_seconds),
            "attempts": Job.attempts + 1,
        }
    elif lease_owner is not None:
        conditions.append(Job.lease_owner == lease_owner)

    if to in (JobStatus.queued, JobStatus.paused):
        values |= {"lease_owner": None, "lease_expires_at": None, "dispatched_at": None}
        if to == JobStatus.paused:
            values["estimated_finish"] = None  # a paused job has no finish to expect
        if refund_attempt:
            if lease_owner is None:
                raise ValueError("only the worker holding the lease can give its attempt back")
            values["attempts"] = Job.attempts - 1  # the claim that counted it is the caller's own (lease_owner)
    if to.is_terminal:
        values |= {"finished_at": now, "lease_owner": None, "lease_expires_at": None}
        if to != JobStatus.succeeded:
            values["estimated_finish"] = None
    if error is not None:
        values["error"] = error

    result = session.execute(
        update(Job).where(*conditions).values(**values).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return False
    # The UPDATE bypassed the ORM: make a loaded copy of the job re-read its columns.
    existing = session.identity_map.get(session.identity_key(Job, job_id))
    if existing is not None:
        session.expire(existing)
    level = "error" if to == JobStatus.failed else "info"
    add_event(session, job_id, STATUS_EVENT[to], message or _default_message(to, error), data, level)
    if to.is_terminal:
        # Webhook outbox rows, in this same transaction; worker/webhooks.py sends them later.
        record_job_outcome(session, job_id, to)
    return True


def _default_message(to: JobStatus, error: dict | None) -> str:
    if to == JobStatus.failed and error:
        return f"Job failed: {error.get('message')}"
    return {
        JobStatus.validating_files: "Validating training file.",
        JobStatus.queued: "Job queued.",
        JobStatus.running: "Fine-tuning job started.",
        JobStatus.cancelling: "Cancellation requested.",
        JobStatus.pausing: "Pause requested; the job pauses at its next step boundary.",
        JobStatus.paused: "Job paused.",
        JobStatus.succeeded: "The job has successfully completed.",
        JobStatus.failed: "Job failed.",
        JobStatus.cancelled: "Job cancelled.",
    }[to]


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: int) -> JobStatus | None:
    """Extend the lease if `owner` still holds it; return the job's status, or None if the lease is lost."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.lease_owner == owner,
            Job.status.in_([JobStatus.running, JobStatus.cancelling, JobStatus.pausing]),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        return None
    return JobStatus(session.query(Job.status).filter(Job.id == job_id).scalar())

"""Operations every job kind shares: lookup, listing, cancel, events. Never commits.

Each kind's service (fine_tuning, and later exports, evaluations, sweeps) passes its `kind`, so a job
is only ever found through its own resource path.
"""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from api.services.pagination import page
from models.config import get_settings
from models.errors import Conflict, InvalidRequest, NotFound, TooManyJobs
from models.file import File
from models.job import Job, JobEvent
from models.job_status import TERMINAL, JobStatus
from models.project import Project
from models.transitions import switch_job_status

# How each kind is named in messages and in the `param` of a 404.
KIND_NAMES = {
    "fine_tune": ("fine-tuning job", "fine_tuning_job_id"),
    "export": ("export job", "export_id"),
    "evaluation": ("evaluation job", "evaluation_id"),
    "sweep": ("sweep", "sweep_id"),
}


def unfinished_count(session: Session, project_id: str) -> int:
    """Jobs of every kind the project holds that have not reached a terminal status."""
    return session.scalar(
        select(func.count()).select_from(Job).where(Job.project_id == project_id, Job.status.not_in(sorted(TERMINAL)))
    )


def check_room(session: Session, project: Project) -> None:
    """Refuse (429 too_many_jobs) a new job of any kind when the project is at its unfinished-jobs limit."""
    limit = get_settings().max_queued_jobs_per_project
    active = unfinished_count(session, project.id)
    if active >= limit:
        raise TooManyJobs(
            f"This project already has {active} unfinished jobs (limit {limit}, GROVE_MAX_QUEUED_JOBS_PER_PROJECT); "
            "wait for some to finish or cancel them."
        )


# Built once: this is the status poll's query, and building a statement and its cache key on every call is
# a measurable part of a poll.
_GET_JOB = select(Job).where(
    Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id"), Job.kind == bindparam("kind")
)


def get(session: Session, project: Project, job_id: str, kind: str) -> Job:
    job = session.scalar(_GET_JOB, {"job_id": job_id, "project_id": project.id, "kind": kind})
    if job is None:
        name, param = KIND_NAMES.get(kind, (f"{kind} job", "job_id"))
        raise NotFound(name, job_id, param=param)
    return job


def list_of_kind(
    session: Session, project: Project, kind: str, after: str | None, limit: int, parent_id: str | None = None
) -> tuple[list[Job], bool]:
    """A page of the project's jobs of `kind`; with `parent_id`, only the children of that job."""
    stmt = select(Job).where(Job.project_id == project.id, Job.kind == kind)
    if parent_id is not None:
        stmt = stmt.where(Job.parent_id == parent_id)
    return page(session, stmt, Job.id, after, limit)


def result_file(session: Session, project: Project, job_id: str, kind: str) -> File:
    """The first result file of a job (its report), or 404 until the job has published one."""
    job = get(session, project, job_id, kind)
    file = None
    if job.result_files:
        file = session.scalar(select(File).where(File.id == job.result_files[0], File.project_id == project.id))
    if file is None:
        name, param = KIND_NAMES.get(kind, (f"{kind} job", "job_id"))
        raise NotFound(f"report of {name}", job.id, param=param)
    return file


def cancel(session: Session, project: Project, job_id: str, kind: str) -> Job:
    """Cancel a job; cancelling one that is already cancelled or cancelling returns it unchanged."""
    job = get(session, project, job_id, kind)
    # A job that has not started stops at once; a running one is asked, and its worker stops it at
    # its next safe point (between two training steps).
    switch_job_status(
        session,
        job.id,
        JobStatus.cancelled,
        only_from={JobStatus.validating_files, JobStatus.queued},
        message="Job cancelled before it started.",
    ) or switch_job_status(session, job.id, JobStatus.cancelling, only_from={JobStatus.running})
    session.flush()
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        _, param = KIND_NAMES.get(kind, (kind, "job_id"))
        raise Conflict(f"Job {job.id} has already {job.status}; it cannot be cancelled.", param=param)
    return job


def event_cursor(after: str | None) -> int | None:
    if after is None:
        return None
    prefix, _, number = after.partition("-")
    if prefix != "ftevent" or not number.isdigit():
        raise InvalidRequest(f"after={after!r} is not an event id.", param="after")
    return int(number)


def list_events(
    session: Session, project: Project, job_id: str, kind: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    job = get(session, project, job_id, kind)
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    return page(session, stmt, JobEvent.id, event_cursor(after), limit)

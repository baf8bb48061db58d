"""Reads every job kind shares: lookup, listing, events, reports; cancel delegates to jobs.lifecycle. Never commits.

Each kind's service (fine_tuning, exports, evaluations, sweeps) passes its `kind`, so a job is only ever found
through its own resource path.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from api.services.pagination import page
from jobs import lifecycle
from models.errors import InvalidRequest, NotFound
from models.file import File
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.project import Project

# Built once: this is the status poll's query, and building a statement and its cache key on every call is
# a measurable part of a poll.
_GET_JOB = select(Job).where(
    Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id"), Job.kind == bindparam("kind")
)


def get(session: Session, project: Project, job_id: str, kind: str) -> Job:
    job = session.scalar(_GET_JOB, {"job_id": job_id, "project_id": project.id, "kind": kind})
    if job is None:
        raise NotFound(JobKind(kind).label, job_id, param=JobKind(kind).id_param)
    return job


def list_of_kind(
    session: Session,
    project: Project,
    kind: str,
    after: str | None,
    limit: int,
    parent_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """A page of the project's jobs of `kind`; with `parent_id`, only the children of that job; with `metadata`,
    only jobs whose metadata holds every pair."""
    stmt = select(Job).where(Job.project_id == project.id, Job.kind == kind)
    if parent_id is not None:
        stmt = stmt.where(Job.parent_id == parent_id)
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.user_metadata[key].as_string() == value)
    return page(session, stmt, Job.id, after, limit)


def result_file(session: Session, project: Project, job_id: str, kind: str) -> File:
    """The first result file of a job (its report), or 404 until the job has published one."""
    job = get(session, project, job_id, kind)
    file = None
    if job.result_files:
        file = session.scalar(select(File).where(File.id == job.result_files[0], File.project_id == project.id))
    if file is None:
        raise NotFound(f"report of {JobKind(kind).label}", job.id, param=JobKind(kind).id_param)
    return file


def cancel(session: Session, project: Project, job_id: str, kind: str) -> Job:
    """Cancel a job; cancelling one that is already cancelled or cancelling returns it unchanged."""
    return lifecycle.cancel(session, get(session, project, job_id, kind))


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


@dataclass(frozen=True)
class KindReads:
    """The reads and the cancel of one kind's resource path, bound to its kind (a job is only found there)."""

    kind: JobKind

    def get(self, session: Session, project: Project, job_id: str) -> Job:
        return get(session, project, job_id, self.kind)

    def list(
        self,
        session: Session,
        project: Project,
        after: str | None,
        limit: int,
        parent_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[list[Job], bool]:
        return list_of_kind(session, project, self.kind, after, limit, parent_id, metadata)

    def cancel(self, session: Session, project: Project, job_id: str) -> Job:
        return cancel(session, project, job_id, self.kind)

    def list_events(
        self, session: Session, project: Project, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEvent], bool]:
        return list_events(session, project, job_id, self.kind, after, limit)

    def report_file(self, session: Session, project: Project, job_id: str) -> File:
        """The published report of a finished job (404 until there is one)."""
        return result_file(session, project, job_id, self.kind)

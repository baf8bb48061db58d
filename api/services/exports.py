"""Export jobs: reads and cancel; creation is jobs.export's. Never commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services import jobs
from jobs import export
from jobs.export_spec import CreateExport
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.project import Project

KIND = JobKind.export


def create(session: Session, project: Project, request: CreateExport) -> Job:
    return export.create(session, project.id, request)


def get(session: Session, project: Project, job_id: str) -> Job:
    return jobs.get(session, project, job_id, KIND)


def list_exports(
    session: Session, project: Project, after: str | None, limit: int, parent_id: str | None = None
) -> tuple[list[Job], bool]:
    return jobs.list_of_kind(session, project, KIND, after, limit, parent_id)


def cancel(session: Session, project: Project, job_id: str) -> Job:
    return jobs.cancel(session, project, job_id, KIND)


def list_events(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    return jobs.list_events(session, project, job_id, KIND, after, limit)

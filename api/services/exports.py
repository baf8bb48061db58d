"""Export jobs: creation (sources and options checked up front), reads, cancel. Never commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.schemas.exports import CreateExport
from api.services import jobs
from jobs.export_spec import KIND, ExportOptions, build_spec, enqueue_export
from models.job import Job, JobEvent
from models.project import Project


def create(session: Session, project: Project, request: CreateExport) -> Job:
    options = ExportOptions.model_validate(request.model_dump(include=set(ExportOptions.model_fields)))
    spec = build_spec(session, project.id, request.source, options)
    jobs.check_room(session, project)
    return enqueue_export(session, project.id, spec, metadata=request.metadata)


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

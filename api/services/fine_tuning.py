"""Fine-tuning jobs: reads, cancel, checkpoints; creation is jobs.fine_tune's. Never commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services import jobs
from api.services.pagination import page
from jobs import fine_tune
from jobs.fine_tune_spec import CreateFineTuningJob
from models.job import Checkpoint, Job, JobEvent
from models.job_kind import JobKind
from models.project import Project


def create(session: Session, project: Project, request: CreateFineTuningJob) -> Job:
    return fine_tune.create(session, project, request)


KIND = JobKind.fine_tune


def get(session: Session, project: Project, job_id: str) -> Job:
    return jobs.get(session, project, job_id, KIND)


def list_jobs(session: Session, project: Project, after: str | None, limit: int) -> tuple[list[Job], bool]:
    return jobs.list_of_kind(session, project, KIND, after, limit)


def cancel(session: Session, project: Project, job_id: str) -> Job:
    return jobs.cancel(session, project, job_id, KIND)


def list_events(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    return jobs.list_events(session, project, job_id, KIND, after, limit)


def list_checkpoints(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[Job, list[Checkpoint], bool]:
    job = get(session, project, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows, has_more = page(session, stmt, Checkpoint.id, after, limit)
    return job, rows, has_more

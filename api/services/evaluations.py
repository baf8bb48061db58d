"""Evaluation jobs: reads, cancel and the report; creation is jobs.evaluation's. Never commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services import jobs
from jobs import evaluation
from jobs.evaluation_spec import CreateEvaluation
from models.file import File
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.project import Project

KIND = JobKind.evaluation


def create(session: Session, project: Project, request: CreateEvaluation) -> Job:
    return evaluation.create(session, project, request)


def get(session: Session, project: Project, job_id: str) -> Job:
    return jobs.get(session, project, job_id, KIND)


def list_evaluations(
    session: Session, project: Project, after: str | None, limit: int, parent_id: str | None = None
) -> tuple[list[Job], bool]:
    return jobs.list_of_kind(session, project, KIND, after, limit, parent_id)


def cancel(session: Session, project: Project, job_id: str) -> Job:
    return jobs.cancel(session, project, job_id, KIND)


def list_events(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    return jobs.list_events(session, project, job_id, KIND, after, limit)


def report_file(session: Session, project: Project, job_id: str) -> File:
    """The published report of a finished evaluation (404 until there is one)."""
    return jobs.result_file(session, project, job_id, KIND)

"""Sweeps: reads, cancel, trials and the report; creation and cancel's rules are jobs.sweep's. Never commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services import jobs
from jobs import sweep
from jobs.sweep_spec import CreateSweep
from models.file import File
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.project import Project

KIND = JobKind.sweep


def create(session: Session, project: Project, request: CreateSweep) -> Job:
    return sweep.create(session, project, request)


def children_of(session: Session, sweep_ids: list[str]) -> dict[str, Job]:
    """The trials (fine-tuning jobs) of these sweeps, by id."""
    if not sweep_ids:
        return {}
    rows = session.scalars(select(Job).where(Job.parent_id.in_(sweep_ids), Job.kind == JobKind.fine_tune))
    return {job.id: job for job in rows}


def get(session: Session, project: Project, sweep_id: str) -> Job:
    return jobs.get(session, project, sweep_id, KIND)


def list_sweeps(session: Session, project: Project, after: str | None, limit: int) -> tuple[list[Job], bool]:
    return jobs.list_of_kind(session, project, KIND, after, limit)


def cancel(session: Session, project: Project, sweep_id: str) -> Job:
    return sweep.cancel(session, jobs.get(session, project, sweep_id, KIND))


def list_events(
    session: Session, project: Project, sweep_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    return jobs.list_events(session, project, sweep_id, KIND, after, limit)


def report_file(session: Session, project: Project, sweep_id: str) -> File:
    """The published report of a finished sweep (404 until there is one)."""
    return jobs.result_file(session, project, sweep_id, KIND)

"""Sweeps: reads, cancel, trials and the report; creation and cancel's rules are jobs.sweep's. Never commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.job_reads import KindReads
from jobs import sweep
from jobs.sweep_spec import CreateSweep
from models.job import Job
from models.job_kind import JobKind
from models.project import Project

_reads = KindReads(JobKind.sweep)
get, list_sweeps, list_events, report_file = _reads.get, _reads.list, _reads.list_events, _reads.report_file


def create(session: Session, project: Project, request: CreateSweep) -> Job:
    return sweep.create(session, project, request)


def children_of(session: Session, sweep_ids: list[str]) -> dict[str, Job]:
    """The trials (fine-tuning jobs) of these sweeps, by id."""
    if not sweep_ids:
        return {}
    rows = session.scalars(select(Job).where(Job.parent_id.in_(sweep_ids), Job.kind == JobKind.fine_tune))
    return {job.id: job for job in rows}


def cancel(session: Session, project: Project, sweep_id: str) -> Job:
    return sweep.cancel(session, get(session, project, sweep_id))

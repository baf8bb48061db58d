"""Fine-tuning jobs: reads, cancel, pause and resume, checkpoints; creation is jobs.fine_tune's. Never commits."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.services.job_reads import KindReads
from api.services.pagination import page
from jobs import fine_tune, lifecycle
from jobs.fine_tune_spec import CreateFineTuningJob
from models.job import Checkpoint, Job
from models.job_kind import JobKind
from models.project import Project


def create(session: Session, project: Project, request: CreateFineTuningJob) -> Job:
    return fine_tune.create(session, project, request)


_reads = KindReads(JobKind.fine_tune)
get, list_jobs, cancel, list_events = _reads.get, _reads.list, _reads.cancel, _reads.list_events


def pause(session: Session, project: Project, job_id: str) -> Job:
    """Pause a job; one already paused or pausing is returned unchanged."""
    return lifecycle.pause(session, get(session, project, job_id))


def resume(session: Session, project: Project, job_id: str) -> Job:
    """Queue a paused job again, to continue from where it paused."""
    return lifecycle.resume(session, get(session, project, job_id))


def list_checkpoints(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[Job, list[Checkpoint], bool]:
    job = get(session, project, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows, has_more = page(session, stmt, Checkpoint.id, after, limit)
    return job, rows, has_more

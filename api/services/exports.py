"""Export jobs: reads and cancel; creation is jobs.export's. Never commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services.job_reads import KindReads
from jobs import export
from jobs.export_spec import CreateExport
from models.job import Job
from models.job_kind import JobKind
from models.project import Project

_reads = KindReads(JobKind.export)
get, list_exports, cancel, list_events = _reads.get, _reads.list, _reads.cancel, _reads.list_events


def create(session: Session, project: Project, request: CreateExport) -> Job:
    return export.create(session, project.id, request)

"""Evaluation jobs: reads, cancel and the report; creation is jobs.evaluation's. Never commits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services.job_reads import KindReads
from jobs import evaluation
from jobs.evaluation_spec import CreateEvaluation
from models.job import Job
from models.job_kind import JobKind
from models.project import Project

_reads = KindReads(JobKind.evaluation)
get, list_evaluations, cancel, list_events = _reads.get, _reads.list, _reads.cancel, _reads.list_events
report_file = _reads.report_file


def create(session: Session, project: Project, request: CreateEvaluation) -> Job:
    return evaluation.create(session, project, request)

"""The work directory's leftovers: a job's scratch directory outlives a worker that died (the next
attempt resumes from its checkpoints), so it is removed once the job is over, by whichever worker
runs next on that volume."""

from __future__ import annotations

import logging
import shutil

from sqlalchemy import select

from models.config import get_settings
from models.db import session_scope
from models.job import Job
from models.job_status import TERMINAL

log = logging.getLogger(__name__)


def remove_finished_work_dirs() -> list[str]:
    """Delete `work_dir/<job id>` of every job that has ended; return their ids. Other entries (the token
    cache, directories of jobs this database does not know) are left alone."""
    root = get_settings().work_dir
    if not root.is_dir():
        return []
    names = [entry.name for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink()]
    if not names:
        return []
    with session_scope() as session:
        finished = session.scalars(select(Job.id).where(Job.id.in_(names), Job.status.in_(sorted(TERMINAL)))).all()
    for job_id in finished:
        shutil.rmtree(root / job_id, ignore_errors=True)
    if finished:
        log.info("removed the work directories of %d finished jobs", len(finished))
    return list(finished)

"""What every job kind shares between its creation and its end: room and dataset checks, enqueue, cancel.

Status itself has one writer, `models.transitions.switch_job_status`; this module decides which transition a
request asks for. Nothing here commits: the message of an enqueued job goes out after the caller's commit.
"""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models.config import get_settings
from models.errors import Conflict, InvalidRequest, TooManyJobs
from models.file import File
from models.ids import new_id
from models.job import Job
from models.job_kind import JobKind
from models.job_status import TERMINAL, JobStatus
from models.queue import dispatch_after_commit
from models.transitions import add_event, switch_job_status


def unfinished_count(session: Session, project_id: str) -> int:
    """Jobs of every kind the project holds that have not reached a terminal status."""
    return session.scalar(
        select(func.count()).select_from(Job).where(Job.project_id == project_id, Job.status.not_in(sorted(TERMINAL)))
    )


def room_left(session: Session, project_id: str) -> int:
    """How many more unfinished jobs the project may hold (GROVE_MAX_QUEUED_JOBS_PER_PROJECT)."""
    return get_settings().max_queued_jobs_per_project - unfinished_count(session, project_id)


def check_room(session: Session, project_id: str) -> None:
    """Refuse (429 too_many_jobs) a new job of any kind when the project is at its unfinished-jobs limit."""
    limit = get_settings().max_queued_jobs_per_project
    active = unfinished_count(session, project_id)
    if active >= limit:
        raise TooManyJobs(
            f"This project already has {active} unfinished jobs (limit {limit}, GROVE_MAX_QUEUED_JOBS_PER_PROJECT); "
            "wait for some to finish or cancel them."
        )


def dataset_file(session: Session, project_id: str, file_id: str, param: str) -> File:
    """An uploaded, validated dataset of the project (400 naming `param` otherwise)."""
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))
    if file is None:
        raise InvalidRequest(f"No file found with id {file_id!r}.", param=param, code="file_not_found")
    if file.purpose != "fine-tune" or file.data_format is None:
        raise InvalidRequest(f"File {file_id} is not an uploaded dataset (purpose 'fine-tune').", param=param)
    return file


def enqueue(session: Session, job: Job, *, queued: str, detail: str = "", dispatch: bool = True) -> Job:
    """Write a new job, its `created` event and its move to `queued`; its message goes out after commit.

    `detail` follows the job's id in the created event; `queued` is the queued event's message. A job that no
    worker runs (a sweep, advanced by the reconciler) is written with `dispatch=False`.
    """
    kind = JobKind(job.kind)
    job.id = job.id or new_id(kind.id_prefix)
    job.status = JobStatus.validating_files
    session.add(job)
    session.flush()
    add_event(session, job.id, "created", f"Created {kind.label}: {job.id}{detail}")
    switch_job_status(session, job.id, JobStatus.queued, message=queued)
    if dispatch:
        dispatch_after_commit(session, job.id, job.kind, job.queue)
    session.flush()
    session.refresh(job)
    return job


def request_cancel(session: Session, job_id: str, message: str | None = None) -> bool:
    """Stop a job that has not started (or is paused) at once; ask a running or pausing one's worker to stop at
    its next safe point (between two training steps). Returns whether the job moved."""
    return (
        switch_job_status(
            session,
            job_id,
            JobStatus.cancelled,
            only_from={JobStatus.validating_files, JobStatus.queued},
            message=message or "Job cancelled before it started.",
        )
        or switch_job_status(
            session,
            job_id,
            JobStatus.cancelled,
            only_from={JobStatus.paused},
            message=message or "Paused job cancelled.",
        )
        or switch_job_status(
            session, job_id, JobStatus.cancelling, only_from={JobStatus.running, JobStatus.pausing}, message=message
        )
    )


def cancel(session: Session, job: Job) -> Job:
    """A user's cancel: one that is already cancelled or cancelling is returned unchanged; a finished one is 409."""
    request_cancel(session, job.id)
    session.flush()
    session.refresh(job)
    if job.status in (JobStatus.succeeded, JobStatus.failed):
        raise Conflict(
            f"Job {job.id} has already {job.status}; it cannot be cancelled.", param=JobKind(job.kind).id_param
        )
    return job


def pause(session: Session, job: Job) -> Job:
    """A user's pause: a queued job is paused at once; a running one's worker is asked to checkpoint at its next
    step boundary and let go of it (`pausing`, then `paused`). One already paused or pausing is returned
    unchanged; a finished or cancelling one, or a sweep's trial, is 409."""
    param = JobKind(job.kind).id_param
    parent = session.get(Job, job.parent_id) if job.parent_id else None
    if parent is not None and parent.kind == JobKind.sweep:
        raise Conflict(
            f"Job {job.id} is a trial of sweep {parent.id}; a paused trial would hold its sweep back, so trials "
            "cannot be paused. Cancel the sweep, or the trial, instead.",
            param=param,
        )
    switch_job_status(
        session, job.id, JobStatus.paused, only_from={JobStatus.queued}, message="Job paused before it started."
    ) or switch_job_status(session, job.id, JobStatus.pausing, only_from={JobStatus.running})
    session.flush()
    session.refresh(job)
    status = JobStatus(job.status)
    if status in (JobStatus.paused, JobStatus.pausing):
        return job
    if status.is_terminal:
        raise Conflict(f"Job {job.id} has already {status}; it cannot be paused.", param=param)
    raise Conflict(f"Job {job.id} is {status}; it cannot be paused.", param=param)


def resume(session: Session, job: Job) -> Job:
    """A user's resume: a paused job is queued again (dispatched after commit) and its worker continues from the
    checkpoint it paused at. Any other job is 409, a pausing one included (resume it once it is paused)."""
    if switch_job_status(
        session,
        job.id,
        JobStatus.queued,
        only_from={JobStatus.paused},
        message="Job resumed; queued to continue from where it paused.",
    ):
        dispatch_after_commit(session, job.id, job.kind, job.queue)
    else:
        session.refresh(job)
        status = JobStatus(job.status)
        state = f"has already {status}" if status.is_terminal else f"is {status}"
        raise Conflict(
            f"Job {job.id} {state}, not paused; only a paused job can be resumed.", param=JobKind(job.kind).id_param
        )
    session.flush()
    session.refresh(job)
    return job


def cancel_children(session: Session, parent_id: str, message: str) -> int:
    """Cancel a job's unfinished children and their own children (a sweep's trials and their evaluations)."""
    child_ids = select(Job.id).where(Job.parent_id == parent_id).scalar_subquery()
    ids = list(
        session.scalars(
            select(Job.id)
            .where(
                or_(Job.parent_id == parent_id, Job.parent_id.in_(child_ids)),
                Job.status.not_in(sorted(TERMINAL)),
            )
            .order_by(Job.id)
        )
    )
    for job_id in ids:
        request_cancel(session, job_id, message)
    return len(ids)

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import ProjectDep, ProjectReadDep, SessionDep, presented_key_hash
from api.query import METADATA_FILTER_PARAMETER, metadata_filter
from api.schemas.common import ListObject
from api.schemas.fine_tuning import (
    CheckpointObject,
    FineTuningJobEventObject,
    FineTuningJobObject,
)
from api.services import event_stream, fine_tuning, idempotency
from jobs.fine_tune_spec import CreateFineTuningJob
from models.job_kind import JobKind

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=FineTuningJobObject)
def create_job(
    request: Request, session: SessionDep, project: ProjectDep, body: CreateFineTuningJob
) -> FineTuningJobObject:
    job = idempotency.create_once(
        session,
        project,
        request.headers.get(idempotency.HEADER),
        idempotency.fingerprint("fine_tuning.jobs", body.model_dump_json()),
        "fine_tuning.job",
        create=lambda: fine_tuning.create(session, project, body),
        fetch=lambda job_id: fine_tuning.get(session, project, job_id),
    )
    return FineTuningJobObject.from_row(job)


@router.get("", response_model=ListObject[FineTuningJobObject], openapi_extra=METADATA_FILTER_PARAMETER)
async def list_jobs(
    request: Request, read: ProjectReadDep, after: str | None = None, limit: Limit = 20
) -> ListObject[FineTuningJobObject]:
    wanted = metadata_filter(request.query_params)

    def run(session, project):
        rows, has_more = fine_tuning.list_jobs(session, project, after, limit, metadata=wanted)
        return ListObject.of([FineTuningJobObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{job_id}", response_model=FineTuningJobObject)
async def get_job(read: ProjectReadDep, job_id: str) -> FineTuningJobObject:
    return await read(lambda session, project: FineTuningJobObject.from_row(fine_tuning.get(session, project, job_id)))


@router.post("/{job_id}/cancel", response_model=FineTuningJobObject)
def cancel_job(session: SessionDep, project: ProjectDep, job_id: str) -> FineTuningJobObject:
    return FineTuningJobObject.from_row(fine_tuning.cancel(session, project, job_id))


@router.post("/{job_id}/pause", response_model=FineTuningJobObject)
def pause_job(session: SessionDep, project: ProjectDep, job_id: str) -> FineTuningJobObject:
    """A queued job pauses at once; a running one checkpoints at its next step boundary and frees its worker."""
    return FineTuningJobObject.from_row(fine_tuning.pause(session, project, job_id))


@router.post("/{job_id}/resume", response_model=FineTuningJobObject)
def resume_job(session: SessionDep, project: ProjectDep, job_id: str) -> FineTuningJobObject:
    """A paused job is queued again and continues from the checkpoint it paused at."""
    return FineTuningJobObject.from_row(fine_tuning.resume(session, project, job_id))


@router.get("/{job_id}/events", response_model=ListObject[FineTuningJobEventObject])
async def list_events(
    request: Request,
    read: ProjectReadDep,
    job_id: str,
    after: str | None = None,
    limit: Limit = 20,
    stream: Annotated[bool, Query(description="Server-Sent Events, oldest first, until the job ends.")] = False,
    last_event_id: Annotated[str | None, Header(description="Resume a stream after this event.")] = None,
) -> ListObject[FineTuningJobEventObject] | StreamingResponse:
    key = presented_key_hash(request)  # streams are counted and re-checked per key

    def run(session, project):
        if stream:
            render = lambda event: FineTuningJobEventObject.from_row(event).model_dump(mode="json")  # noqa: E731
            cursor = last_event_id or after
            return event_stream.open_stream(session, project, key, job_id, JobKind.fine_tune, cursor, render)
        rows, has_more = fine_tuning.list_events(session, project, job_id, after, limit)
        return ListObject.of([FineTuningJobEventObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{job_id}/checkpoints", response_model=ListObject[CheckpointObject])
async def list_checkpoints(
    read: ProjectReadDep, job_id: str, after: str | None = None, limit: Limit = 10
) -> ListObject[CheckpointObject]:
    def run(session, project):
        job, rows, has_more = fine_tuning.list_checkpoints(session, project, job_id, after, limit)
        return ListObject.of([CheckpointObject.from_row(r, job) for r in rows], has_more)

    return await read(run)

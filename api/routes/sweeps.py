from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from api.content import file_content
from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.sweeps import SweepEventObject, SweepObject
from api.services import idempotency, sweeps
from jobs.sweep_spec import CreateSweep

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
Limit = Annotated[int, Query(ge=1, le=1000)]


def _object(session, job) -> SweepObject:
    return SweepObject.from_row(job, sweeps.children_of(session, [job.id]))


@router.post("", response_model=SweepObject)
def create_sweep(request: Request, session: SessionDep, project: ProjectDep, body: CreateSweep) -> SweepObject:
    job = idempotency.create_once(
        session,
        project,
        request.headers.get(idempotency.HEADER),
        idempotency.fingerprint("sweeps", body.model_dump_json()),
        "sweep",
        create=lambda: sweeps.create(session, project, body),
        fetch=lambda sweep_id: sweeps.get(session, project, sweep_id),
    )
    return _object(session, job)


@router.get("", response_model=ListObject[SweepObject])
async def list_sweeps(read: ProjectReadDep, after: str | None = None, limit: Limit = 20) -> ListObject[SweepObject]:
    def run(session, project):
        rows, has_more = sweeps.list_sweeps(session, project, after, limit)
        children = sweeps.children_of(session, [r.id for r in rows])
        return ListObject.of([SweepObject.from_row(r, children) for r in rows], has_more)

    return await read(run)


@router.get("/{sweep_id}", response_model=SweepObject)
async def get_sweep(read: ProjectReadDep, sweep_id: str) -> SweepObject:
    return await read(lambda session, project: _object(session, sweeps.get(session, project, sweep_id)))


@router.post("/{sweep_id}/cancel", response_model=SweepObject)
def cancel_sweep(session: SessionDep, project: ProjectDep, sweep_id: str) -> SweepObject:
    return _object(session, sweeps.cancel(session, project, sweep_id))


@router.get("/{sweep_id}/events", response_model=ListObject[SweepEventObject])
async def list_events(
    read: ProjectReadDep, sweep_id: str, after: str | None = None, limit: Limit = 20
) -> ListObject[SweepEventObject]:
    def run(session, project):
        rows, has_more = sweeps.list_events(session, project, sweep_id, after, limit)
        return ListObject.of([SweepEventObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{sweep_id}/report", response_class=FileResponse)
def get_report(request: Request, session: SessionDep, project: ProjectDep, sweep_id: str) -> Response:
    """The report (JSON: every trial's parameters, state and objective, the best trial), also result_files[0]."""
    report = sweeps.report_file(session, project, sweep_id)
    return file_content(request, report, media_type="application/json", attachment=False)

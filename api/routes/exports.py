from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.exports import ExportJobEventObject, ExportJobObject
from api.services import exports
from jobs.export_spec import CreateExport

router = APIRouter(prefix="/v1/exports", tags=["exports"])
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", response_model=ExportJobObject)
def create_export(session: SessionDep, project: ProjectDep, body: CreateExport) -> ExportJobObject:
    return ExportJobObject.from_row(exports.create(session, project, body))


@router.get("", response_model=ListObject[ExportJobObject])
async def list_exports(
    read: ProjectReadDep,
    after: str | None = None,
    limit: Limit = 20,
    parent_id: Annotated[str | None, Query(description="Only exports created by this fine-tuning job.")] = None,
) -> ListObject[ExportJobObject]:
    def run(session, project):
        rows, has_more = exports.list_exports(session, project, after, limit, parent_id)
        return ListObject.of([ExportJobObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{export_id}", response_model=ExportJobObject)
async def get_export(read: ProjectReadDep, export_id: str) -> ExportJobObject:
    return await read(lambda session, project: ExportJobObject.from_row(exports.get(session, project, export_id)))


@router.post("/{export_id}/cancel", response_model=ExportJobObject)
def cancel_export(session: SessionDep, project: ProjectDep, export_id: str) -> ExportJobObject:
    return ExportJobObject.from_row(exports.cancel(session, project, export_id))


@router.get("/{export_id}/events", response_model=ListObject[ExportJobEventObject])
async def list_events(
    read: ProjectReadDep, export_id: str, after: str | None = None, limit: Limit = 20
) -> ListObject[ExportJobEventObject]:
    def run(session, project):
        rows, has_more = exports.list_events(session, project, export_id, after, limit)
        return ListObject.of([ExportJobEventObject.from_row(r) for r in rows], has_more)

    return await read(run)

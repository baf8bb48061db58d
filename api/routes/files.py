from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi import File as FileParam
from fastapi.responses import FileResponse, Response

from api.content import file_content
from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.files import FileDeleted, FileObject
from api.services import files as file_service
from api.services import idempotency
from models.storage import CHUNK

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post("", response_model=FileObject)
def upload_file(
    request: Request,
    session: SessionDep,
    project: ProjectDep,
    file: Annotated[UploadFile, FileParam(description="JSONL dataset.")],
    purpose: Annotated[str, Form()],
) -> FileObject:
    def chunks():
        while chunk := file.file.read(CHUNK):
            yield chunk

    row = file_service.upload(
        session, project, file.filename, purpose, chunks(), request.headers.get(idempotency.HEADER)
    )
    return FileObject.from_row(row)


@router.get("", response_model=ListObject[FileObject])
async def list_files(
    read: ProjectReadDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    purpose: str | None = None,
) -> ListObject[FileObject]:
    def run(session, project):
        rows, has_more = file_service.list_files(session, project, after, limit, purpose)
        return ListObject.of([FileObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/{file_id}", response_model=FileObject)
async def get_file(read: ProjectReadDep, file_id: str) -> FileObject:
    return await read(lambda session, project: FileObject.from_row(file_service.get(session, project, file_id)))


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(session: SessionDep, project: ProjectDep, file_id: str) -> FileDeleted:
    file_service.delete(session, project, file_id)
    return FileDeleted(id=file_id)


@router.get("/{file_id}/content", response_class=FileResponse)
def download_file(request: Request, session: SessionDep, project: ProjectDep, file_id: str) -> Response:
    file = file_service.get(session, project, file_id)
    media_type = "application/jsonl" if file.filename.endswith(".jsonl") else None
    return file_content(request, file, media_type=media_type)

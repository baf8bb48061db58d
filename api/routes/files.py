from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from api.content import file_content
from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.files import FileDeleted, FileObject
from api.services import files as file_service
from api.services import idempotency
from api.services.pagination import ListOrder
from api.upload_form import UploadForm, multipart_request_body, upload_limiter
from models.db import session_scope
from models.project import Project

router = APIRouter(prefix="/v1/files", tags=["files"])


# The body is read by the route itself (api/upload_form.py), so it declares no Form or File parameters: the
# request body is documented here instead.
UPLOAD_REQUEST_BODY = multipart_request_body(
    "Body_upload_file_v1_files_post", "file", "File", "JSONL dataset.", purpose={}
)


@router.post("", response_model=FileObject, openapi_extra={"requestBody": UPLOAD_REQUEST_BODY})
async def upload_file(request: Request, read: ProjectReadDep) -> FileObject:
    # The key is checked (in a read session of its own, closed at once) before a byte of the body is read.
    project = await read(lambda _session, project: project)
    form = UploadForm(request, fields=file_service.UPLOAD_FIELDS)
    idempotency_key = request.headers.get(idempotency.HEADER)
    return await anyio.to_thread.run_sync(_store_upload, project, form, idempotency_key, limiter=upload_limiter())


def _store_upload(project: Project, form: UploadForm, idempotency_key: str | None) -> FileObject:
    # Committed before the response goes out, as SessionDep does; the session connects only once the body is in.
    with session_scope() as session:
        return FileObject.from_row(file_service.upload(session, project, form, idempotency_key))


@router.get("", response_model=ListObject[FileObject])
async def list_files(
    read: ProjectReadDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000, description="Files per page, 1 to 10,000.")] = 100,
    order: Annotated[
        ListOrder, Query(description="By creation time: desc (newest first, the default) or asc.")
    ] = "desc",
    purpose: Annotated[str | None, Query(description="Only files with this purpose.")] = None,
) -> ListObject[FileObject]:
    def run(session, project):
        rows, has_more = file_service.list_files(session, project, after, limit, purpose, order)
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

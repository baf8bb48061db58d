"""Multipart uploads: OpenAI's `/v1/uploads` API, for datasets above the single upload's limit
(GROVE_MAX_UPLOAD_BYTES): create, add parts (each at most GROVE_MAX_UPLOAD_PART_BYTES), complete into a File,
cancel. The rules and the order of writes are in api/services/uploads.py."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request

from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.uploads import CompleteUpload, CreateUpload, UploadObject, UploadPartObject
from api.services import idempotency
from api.services import uploads as service
from api.upload_form import UploadForm, multipart_request_body, upload_limiter
from models.db import session_scope
from models.project import Project

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

# The part's body is read by the route itself (api/upload_form.py): it is documented here.
PART_REQUEST_BODY = multipart_request_body("Body_add_upload_part", service.PART_FIELD, "Data", "The part's bytes.")


def _key(request: Request) -> str | None:
    return request.headers.get(idempotency.HEADER)


@router.post("", response_model=UploadObject)
def create_upload(request: Request, session: SessionDep, project: ProjectDep, body: CreateUpload) -> UploadObject:
    upload = idempotency.create_once(
        session,
        project,
        _key(request),
        idempotency.fingerprint("uploads", body.model_dump_json()),
        "upload",
        create=lambda: service.create(session, project, body),
        fetch=lambda upload_id: service.get(session, project, upload_id),
    )
    return UploadObject.from_row(upload)


@router.post("/{upload_id}/parts", response_model=UploadPartObject, openapi_extra={"requestBody": PART_REQUEST_BODY})
async def add_upload_part(request: Request, read: ProjectReadDep, upload_id: str) -> UploadPartObject:
    # The key and the upload are checked (in a read session of its own, closed at once) before a byte of the
    # body is read.
    project, form = await read(
        lambda session, project: (project, service.part_form(session, project, upload_id, request))
    )
    return await anyio.to_thread.run_sync(
        _store_part, project, upload_id, form, _key(request), limiter=upload_limiter()
    )


def _store_part(project: Project, upload_id: str, form: UploadForm, idempotency_key: str | None) -> UploadPartObject:
    # Committed before the response goes out, as SessionDep does; the session connects only once the body is in.
    with session_scope() as session:
        return UploadPartObject.from_row(service.add_part(session, project, upload_id, form, idempotency_key))


@router.post("/{upload_id}/complete", response_model=UploadObject)
def complete_upload(
    request: Request, session: SessionDep, project: ProjectDep, upload_id: str, body: CompleteUpload
) -> UploadObject:
    upload = idempotency.create_once(
        session,
        project,
        _key(request),
        idempotency.fingerprint("uploads.complete", upload_id, body.model_dump_json()),
        "upload",
        create=lambda: service.complete(session, project, upload_id, body),
        fetch=lambda same_id: service.get(session, project, same_id),
    )
    return UploadObject.from_row(upload, service.file_of(session, upload))


@router.post("/{upload_id}/cancel", response_model=UploadObject)
def cancel_upload(request: Request, session: SessionDep, project: ProjectDep, upload_id: str) -> UploadObject:
    upload = idempotency.create_once(
        session,
        project,
        _key(request),
        idempotency.fingerprint("uploads.cancel", upload_id),
        "upload",
        create=lambda: service.cancel(session, project, upload_id),
        fetch=lambda same_id: service.get(session, project, same_id),
    )
    return UploadObject.from_row(upload)

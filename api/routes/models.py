"""Base models: any key lists and reads them; an admin key imports (POST, multipart) and deletes them."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request

from api.deps import AdminDep, AdminReadDep, ProjectDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.models import ModelDeleted, ModelObject
from api.services import models as model_service
from api.upload_form import UploadForm, multipart_request_body, upload_limiter
from models.config import get_settings
from models.errors import NotFound
from models.model_store import MODEL_NAME, list_models

router = APIRouter(prefix="/v1/models", tags=["models"])

# The body is read by the route itself (api/upload_form.py), as POST /v1/files does: documented here.
IMPORT_REQUEST_BODY = multipart_request_body(
    "Body_import_base_model_v1_models_post",
    "file",
    "File",
    "A tar archive (.tar, .tar.gz, .tgz) of a Hugging Face model directory (safetensors weights, config.json, "
    "tokenizer), or a .gguf file.",
    name={"description": "The new model's id."},
)


@router.get("", response_model=ListObject[ModelObject])
def list_base_models(_: ProjectDep) -> ListObject[ModelObject]:
    return ListObject.of([ModelObject.from_info(m) for m in list_models()], has_more=False)


@router.post("", response_model=ModelObject, openapi_extra={"requestBody": IMPORT_REQUEST_BODY})
async def import_base_model(request: Request, read: AdminReadDep) -> ModelObject:
    """Import a base model (admin keys only): checked, then published whole. The request waits for the import."""
    await read(lambda _session, caller: caller)  # the key is checked before a byte of the body is read
    settings = get_settings()
    form = UploadForm(
        request,
        fields=model_service.UPLOAD_FIELDS,
        limit=settings.max_model_upload_bytes,
        limit_name="GROVE_MAX_MODEL_UPLOAD_BYTES",
    )
    info = await anyio.to_thread.run_sync(model_service.import_upload, form, limiter=upload_limiter())
    return ModelObject.from_info(info)


@router.get("/{model_id}", response_model=ModelObject)
def get_base_model(_: ProjectDep, model_id: str) -> ModelObject:
    found = [m for m in list_models() if m.name == model_id] if MODEL_NAME.match(model_id) else []
    if not found:
        raise NotFound("model", model_id, param="model")
    return ModelObject.from_info(found[0])


@router.delete("/{model_id}", response_model=ModelDeleted)
def delete_base_model(session: SessionDep, _: AdminDep, model_id: str) -> ModelDeleted:
    """Delete a base model (admin keys only); 409 while an unfinished job of any project uses it."""
    model_service.delete(session, model_id)
    return ModelDeleted(id=model_id)

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ProjectDep
from api.schemas.common import ListObject
from api.schemas.models import ModelObject
from models.errors import NotFound
from models.model_store import MODEL_NAME, list_models

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ListObject[ModelObject])
def list_base_models(_: ProjectDep) -> ListObject[ModelObject]:
    return ListObject.of([ModelObject.from_info(m) for m in list_models()], has_more=False)


@router.get("/{model_id}", response_model=ModelObject)
def get_base_model(_: ProjectDep, model_id: str) -> ModelObject:
    found = [m for m in list_models() if m.name == model_id] if MODEL_NAME.match(model_id) else []
    if not found:
        raise NotFound("model", model_id, param="model")
    return ModelObject.from_info(found[0])

"""Checkpoint permissions (OpenAI's /v1/fine_tuning/checkpoints/{checkpoint}/permissions): share a fine-tune's
checkpoint with other projects. The owner's project keys and admin keys manage them; see the service."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from api.deps import CallerDep, CallerReadDep, SessionDep
from api.schemas.checkpoint_permissions import (
    CheckpointPermissionObject,
    CreateCheckpointPermission,
    DeletedCheckpointPermission,
)
from api.schemas.common import ListObject
from api.services import checkpoint_permissions

router = APIRouter(prefix="/v1/fine_tuning/checkpoints", tags=["fine-tuning"])

# `{model}:ckpt-step-{step}:{job_id}` or `ftckpt-...`; a client may send the colons as %3A, decoded alike.
CheckpointName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=300,
        description="The checkpoint's fine_tuned_model_checkpoint name, or its id (ftckpt-...).",
    ),
]


@router.post("/{fine_tuned_model_checkpoint}/permissions", response_model=ListObject[CheckpointPermissionObject])
def create_permissions(
    session: SessionDep,
    caller: CallerDep,
    fine_tuned_model_checkpoint: CheckpointName,
    body: CreateCheckpointPermission,
) -> ListObject[CheckpointPermissionObject]:
    rows = checkpoint_permissions.create(session, caller, fine_tuned_model_checkpoint, body.project_ids)
    return ListObject.of([CheckpointPermissionObject.from_row(r) for r in rows], has_more=False)


@router.get("/{fine_tuned_model_checkpoint}/permissions", response_model=ListObject[CheckpointPermissionObject])
async def list_permissions(
    read: CallerReadDep,
    fine_tuned_model_checkpoint: CheckpointName,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    order: Literal["ascending", "descending"] = "descending",
    project_id: Annotated[str | None, Query(description="Only the permission of this project.")] = None,
) -> ListObject[CheckpointPermissionObject]:
    def run(session, caller):
        rows, has_more = checkpoint_permissions.list_permissions(
            session, caller, fine_tuned_model_checkpoint, after, limit, order, project_id
        )
        return ListObject.of([CheckpointPermissionObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.delete("/{fine_tuned_model_checkpoint}/permissions/{permission_id}", response_model=DeletedCheckpointPermission)
def delete_permission(
    session: SessionDep, caller: CallerDep, fine_tuned_model_checkpoint: CheckpointName, permission_id: str
) -> DeletedCheckpointPermission:
    permission = checkpoint_permissions.delete(session, caller, fine_tuned_model_checkpoint, permission_id)
    return DeletedCheckpointPermission(id=permission.id)

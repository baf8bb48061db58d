"""Checkpoint permissions, shaped like OpenAI's (`client.fine_tuning.checkpoints.permissions.*` of the OpenAI SDK
works unchanged)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.base import unix
from models.checkpoint_permission import CheckpointPermission
from models.request_body import RequestBody

# More grants than this in one request are a loop's job, and one transaction holds them all.
MAX_PROJECTS_PER_GRANT = 100


class CreateCheckpointPermission(RequestBody):
    model_config = ConfigDict(extra="forbid")

    project_ids: list[str] = Field(
        min_length=1,
        max_length=MAX_PROJECTS_PER_GRANT,
        description="Ids of the projects (proj-...) that may use the checkpoint: start a fine-tune from it, "
        "evaluate it, export it. A project granted already keeps its permission.",
    )


class CheckpointPermissionObject(BaseModel):
    id: str = Field(description="The permission's id (cp-...), for deleting it.")
    object: Literal["checkpoint.permission"] = Field(
        "checkpoint.permission", description="Always checkpoint.permission."
    )
    created_at: int = Field(description="When the permission was granted (Unix seconds).")
    project_id: str = Field(description="The project the checkpoint is shared with.")

    @classmethod
    def from_row(cls, permission: CheckpointPermission) -> CheckpointPermissionObject:
        return cls(id=permission.id, created_at=unix(permission.created_at), project_id=permission.project_id)


class DeletedCheckpointPermission(BaseModel):
    id: str = Field(description="The permission deleted.")
    object: Literal["checkpoint.permission"] = Field(
        "checkpoint.permission", description="Always checkpoint.permission."
    )
    deleted: bool = Field(True, description="Always true: a permission not found is a 404.")

"""API keys as the admin routes show them: never the key itself, except once, in the answer to its creation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.base import unix
from models.project import ApiKey, Project
from models.request_body import RequestBody


class CreateApiKey(RequestBody):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["project", "admin"] = Field(
        "project",
        description="project: the key reaches one project's files, jobs and other resources; admin: it manages "
        "keys and reaches nothing else.",
    )
    project: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="Name of the project a project key belongs to; created if new. Not given for admin keys.",
    )


class ApiKeyObject(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    scope: Literal["project", "admin"]
    project_id: str | None
    project: str | None = Field(description="The project's name (project keys).")
    hint: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, key: ApiKey, project: Project | None) -> ApiKeyObject:
        return cls(
            id=key.id,
            scope=key.scope,
            project_id=key.project_id,
            project=project.name if project else None,
            hint=key.hint,
            created_at=unix(key.created_at),
            revoked_at=unix(key.revoked_at),
        )


class ApiKeyWithSecretObject(ApiKeyObject):
    key: str = Field(description="The key itself: shown only in this answer, stored only as its sha256.")

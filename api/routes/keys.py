"""Key management over HTTP, for admin keys only: create, list, get and revoke API keys."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import AdminDep, AdminReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.keys import ApiKeyObject, ApiKeyWithSecretObject, CreateApiKey
from api.services import keys

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])


@router.post("", response_model=ApiKeyWithSecretObject)
def create_key(session: SessionDep, _: AdminDep, body: CreateApiKey) -> ApiKeyWithSecretObject:
    row, project, key = keys.create(session, body.scope, body.project)
    return ApiKeyWithSecretObject(**ApiKeyObject.from_row(row, project).model_dump(), key=key)


@router.get("", response_model=ListObject[ApiKeyObject])
async def list_keys(
    read: AdminReadDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    project: Annotated[str | None, Query(description="Only the keys of the project of this name.")] = None,
    scope: Literal["project", "admin"] | None = None,
) -> ListObject[ApiKeyObject]:
    def run(session, _):
        rows, has_more = keys.list_keys(session, after, limit, project, scope)
        return ListObject.of([ApiKeyObject.from_row(k, p) for k, p in rows], has_more)

    return await read(run)


@router.get("/{key_id}", response_model=ApiKeyObject)
async def get_key(read: AdminReadDep, key_id: str) -> ApiKeyObject:
    return await read(lambda session, _: ApiKeyObject.from_row(*keys.get(session, key_id)))


@router.post("/{key_id}/revoke", response_model=ApiKeyObject)
def revoke_key(session: SessionDep, _: AdminDep, key_id: str) -> ApiKeyObject:
    """Revoke the key: every later request with it gets 401. The row stays, with its `revoked_at`."""
    return ApiKeyObject.from_row(*keys.revoke(session, key_id))

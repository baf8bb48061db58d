"""Webhook endpoints: OpenAI's `/v1/webhook_endpoints` API, plus each endpoint's deliveries."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ProjectDep, ProjectReadDep, SessionDep
from api.schemas.common import ListObject
from api.schemas.webhooks import (
    CreateWebhookEndpoint,
    DeletedWebhookEndpoint,
    RotateSecret,
    TestWebhookEndpoint,
    UpdateWebhookEndpoint,
    WebhookDeliveryObject,
    WebhookEndpointObject,
    WebhookEndpointTestResult,
    WebhookEndpointWithSecretObject,
    WebhookEventTypeList,
)
from api.services import webhooks as service
from models.webhook import EVENT_TYPES

router = APIRouter(prefix="/v1", tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.get("/webhook_event_types", response_model=WebhookEventTypeList)
def list_event_types(_: ProjectDep) -> WebhookEventTypeList:
    return WebhookEventTypeList(data=list(EVENT_TYPES))


@router.post("/webhook_endpoints", response_model=WebhookEndpointWithSecretObject)
def create_endpoint(
    session: SessionDep, project: ProjectDep, body: CreateWebhookEndpoint
) -> WebhookEndpointWithSecretObject:
    return WebhookEndpointWithSecretObject.from_row(service.create(session, project, body))


@router.get("/webhook_endpoints", response_model=ListObject[WebhookEndpointObject])
async def list_endpoints(
    read: ProjectReadDep, after: str | None = None, limit: Limit = 20
) -> ListObject[WebhookEndpointObject]:
    def run(session, project):
        rows, has_more = service.list_endpoints(session, project, after, limit)
        return ListObject.of([WebhookEndpointObject.from_row(r) for r in rows], has_more)

    return await read(run)


@router.get("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject)
async def get_endpoint(read: ProjectReadDep, webhook_endpoint_id: str) -> WebhookEndpointObject:
    return await read(
        lambda session, project: WebhookEndpointObject.from_row(service.get(session, project, webhook_endpoint_id))
    )


@router.post("/webhook_endpoints/{webhook_endpoint_id}", response_model=WebhookEndpointObject)
def update_endpoint(
    session: SessionDep, project: ProjectDep, webhook_endpoint_id: str, body: UpdateWebhookEndpoint
) -> WebhookEndpointObject:
    return WebhookEndpointObject.from_row(service.update(session, project, webhook_endpoint_id, body))


@router.delete("/webhook_endpoints/{webhook_endpoint_id}", response_model=DeletedWebhookEndpoint)
def delete_endpoint(session: SessionDep, project: ProjectDep, webhook_endpoint_id: str) -> DeletedWebhookEndpoint:
    service.delete(session, project, webhook_endpoint_id)
    return DeletedWebhookEndpoint(id=webhook_endpoint_id)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret", response_model=WebhookEndpointWithSecretObject)
def rotate_secret(
    session: SessionDep, project: ProjectDep, webhook_endpoint_id: str, body: RotateSecret | None = None
) -> WebhookEndpointWithSecretObject:
    keep = body.keep_old_secret_active_for_24_hours if body else False
    return WebhookEndpointWithSecretObject.from_row(service.rotate_secret(session, project, webhook_endpoint_id, keep))


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test", response_model=WebhookEndpointTestResult)
def test_endpoint(
    session: SessionDep, project: ProjectDep, webhook_endpoint_id: str, body: TestWebhookEndpoint
) -> WebhookEndpointTestResult:
    status = service.send_test(session, project, webhook_endpoint_id, body.event_type)
    return WebhookEndpointTestResult(
        event_type=body.event_type, status_code=status, webhook_endpoint_id=webhook_endpoint_id
    )


@router.get("/webhook_endpoints/{webhook_endpoint_id}/deliveries", response_model=ListObject[WebhookDeliveryObject])
async def list_deliveries(
    read: ProjectReadDep, webhook_endpoint_id: str, after: str | None = None, limit: Limit = 20
) -> ListObject[WebhookDeliveryObject]:
    def run(session, project):
        rows, has_more = service.list_deliveries(session, project, webhook_endpoint_id, after, limit)
        return ListObject.of([WebhookDeliveryObject.from_row(d, e) for d, e in rows], has_more)

    return await read(run)

"""Webhook endpoints: OpenAI's `/v1/webhook_endpoints` API, plus each endpoint's deliveries.

A test delivery is an outbound request the server makes on a tenant's word: it is limited per key
(GROVE_WEBHOOK_TEST_RATE_LIMIT), and sent after the endpoint was read and the database session let go.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from limits import parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from api.deps import ProjectDep, ProjectReadDep, Read, SessionDep, bearer_key
from api.errors import error_response
from api.limits import limiter_storage_url
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
from models.config import get_settings
from models.errors import RateLimited
from models.project import Project, hash_key
from models.webhook import EVENT_TYPES

log = logging.getLogger(__name__)
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


@lru_cache
def _test_limiter(storage_url: str) -> MovingWindowRateLimiter:
    return MovingWindowRateLimiter(storage_from_string(storage_url))


def _tests_wait(key: str) -> int | None:
    """Count one test delivery of this key; None when allowed, else the seconds until one is."""
    settings = get_settings()
    # The counters live where the API's rate limit keeps its own (Redis when the broker is Redis).
    limiter = _test_limiter(limiter_storage_url(settings).removeprefix("async+"))
    identity = f"webhook-test:{hash_key(key)}"
    try:
        for item in parse_many(settings.webhook_test_rate_limit):
            if not limiter.hit(item, identity):
                reset_time, _ = limiter.get_window_stats(item, identity)
                return max(1, math.ceil(reset_time - time.time()))
    except Exception as exc:  # the counter store is down: serve, as the API's rate limit does
        log.warning("webhook test rate limiter unavailable, request not counted: %s", exc)
    return None


async def _key_checked_first(read: ProjectReadDep) -> Read[Project]:
    # FastAPI parses a route's body before the route runs, and a read checks the key only when called: check it
    # here, as a dependency (run before the body), so that a revoked key is a 401 and never a 400 about the body.
    await read(lambda _session, _project: None)
    return read


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test", response_model=WebhookEndpointTestResult)
async def test_endpoint(
    request: Request,
    read: Annotated[Read[Project], Depends(_key_checked_first)],
    webhook_endpoint_id: str,
    body: TestWebhookEndpoint,
) -> WebhookEndpointTestResult | Response:
    # Read, and give the connection back before the POST: a slow endpoint must not hold database sessions.
    sample = await read(
        lambda session, project: service.sample_event(session, project, webhook_endpoint_id, body.event_type)
    )
    wait = await anyio.to_thread.run_sync(_tests_wait, bearer_key(request))
    if wait is not None:
        error = RateLimited(
            f"Test deliveries are limited to {get_settings().webhook_test_rate_limit} per key "
            f"(GROVE_WEBHOOK_TEST_RATE_LIMIT); retry after {wait} s."
        )
        return error_response(error, headers={"retry-after": str(wait)})
    status = await anyio.to_thread.run_sync(service.send_test, sample)
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

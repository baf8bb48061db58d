"""Webhook endpoints of a project: register, list, update, delete, rotate the secret, test; deliveries.

Never commits, and a test delivery is sent holding no session at all. Destination URLs are checked against
the operator's policy (models/destinations.py) when they are registered and again before every delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.schemas.webhooks import CreateWebhookEndpoint, UpdateWebhookEndpoint
from api.services.pagination import page
from models.base import utcnow
from models.destinations import resolve_destination
from models.errors import GroveError, InvalidRequest, NotFound
from models.ids import new_id
from models.project import Project
from models.webhook import (
    EVENT_TYPES,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    event_payload,
    new_signing_secret,
)

SAMPLE_DATA_ID = {"fine_tuning.job": "ftjob-test", "export.job": "export-test", "evaluation.job": "eval-test"}


class WebhookUnreachable(GroveError):
    status_code = 502
    type = "server_error"
    code = "webhook_unreachable"


def _check_event_types(event_types: list[str], param: str = "event_types") -> list[str]:
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(f"Unknown event type {unknown[0]!r}; Grove sends: {', '.join(EVENT_TYPES)}.", param=param)
    return list(dict.fromkeys(event_types))


def create(session: Session, project: Project, request: CreateWebhookEndpoint) -> WebhookEndpoint:
    event_types = _check_event_types(request.event_types)
    resolve_destination(request.url)
    endpoint = WebhookEndpoint(
        id=new_id("whep"),
        project_id=project.id,
        name=request.name,
        url=request.url,
        event_types=event_types,
        signing_secret=new_signing_secret(),
    )
    session.add(endpoint)
    session.flush()
    return endpoint


def get(session: Session, project: Project, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.project_id == project.id)
    )
    if endpoint is None:
        raise NotFound("webhook endpoint", endpoint_id, param="webhook_endpoint_id")
    return endpoint


def list_endpoints(
    session: Session, project: Project, after: str | None, limit: int
) -> tuple[list[WebhookEndpoint], bool]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.project_id == project.id)
    return page(session, stmt, WebhookEndpoint.id, after, limit)


def update(session: Session, project: Project, endpoint_id: str, request: UpdateWebhookEndpoint) -> WebhookEndpoint:
    endpoint = get(session, project, endpoint_id)
    changed = False
    if request.event_types is not None:
        event_types = _check_event_types(request.event_types)
        changed |= event_types != endpoint.event_types
        endpoint.event_types = event_types
    if request.name is not None:
        changed |= request.name != endpoint.name
        endpoint.name = request.name
    if request.url is not None:
        resolve_destination(request.url)
        changed |= request.url != endpoint.url
        endpoint.url = request.url
    if changed:
        endpoint.updated_at = utcnow()
    session.flush()
    return endpoint


def delete(session: Session, project: Project, endpoint_id: str) -> None:
    """Deleting an endpoint drops its pending deliveries with it."""
    session.delete(get(session, project, endpoint_id))
    session.flush()


def rotate_secret(session: Session, project: Project, endpoint_id: str, keep_old_for_24h: bool) -> WebhookEndpoint:
    endpoint = get(session, project, endpoint_id)
    now = utcnow()
    if keep_old_for_24h:
        endpoint.previous_secret = endpoint.signing_secret
        endpoint.previous_secret_expires_at = now + timedelta(hours=24)
    else:
        endpoint.previous_secret = None
        endpoint.previous_secret_expires_at = None
    endpoint.signing_secret = new_signing_secret()
    endpoint.updated_at = now
    session.flush()
    return endpoint


@dataclass(frozen=True)
class SampleEvent:
    """A test delivery, read from the database and ready to send without it."""

    url: str
    secrets: list[str]
    event_id: str
    payload: dict


def sample_event(session: Session, project: Project, endpoint_id: str, event_type: str) -> SampleEvent:
    """The sample event a test of `endpoint_id` sends: everything `send_test` needs, read now."""
    event_type = _check_event_types([event_type], param="event_type")[0]
    endpoint = get(session, project, endpoint_id)
    event_id = new_id("evt")
    data_id = SAMPLE_DATA_ID.get(event_type.rsplit(".", 1)[0], "job-test")
    payload = event_payload(event_id, event_type, utcnow(), {"id": data_id})
    return SampleEvent(endpoint.url, endpoint.active_secrets(), event_id, payload)


def send_test(sample: SampleEvent) -> int:
    """POST a sample event now and return the endpoint's status code. Not recorded as a delivery.

    Takes no session: the endpoint may take the whole webhook timeout to answer, and a caller holding a
    database connection that long could drain the pool with a few slow endpoints."""
    import httpx

    from models.webhook_signing import post

    try:
        return post(sample.url, sample.secrets, sample.event_id, sample.payload).status_code
    except httpx.HTTPError as exc:
        raise WebhookUnreachable(f"Could not reach {sample.url}: {exc.__class__.__name__}: {exc}") from None


def list_deliveries(
    session: Session, project: Project, endpoint_id: str, after: str | None, limit: int
) -> tuple[list[tuple[WebhookDelivery, WebhookEvent]], bool]:
    endpoint = get(session, project, endpoint_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    rows, has_more = page(session, stmt, WebhookDelivery.id, after, limit)
    events = {
        e.id: e for e in session.scalars(select(WebhookEvent).where(WebhookEvent.id.in_([r.event_id for r in rows])))
    }
    return [(r, events[r.event_id]) for r in rows], has_more

"""Webhook delivery: send due deliveries, sign them, retry failures with exponential backoff.

Deliveries are rows (models/webhook.py) written in the same transaction as the job's terminal
transition. `send_due` claims due rows with a conditional update (several senders may run: the beat's
Celery task, and the thread inside each API process of the embedded deployment), sends each one with no
database transaction open, and records the outcome.

Signing and the POST itself are models/webhook_signing.py's.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import httpx
from sqlalchemy import or_, select, update

from models.base import utcnow
from models.config import get_settings
from models.db import session_scope
from models.destinations import UnsafeDestination
from models.queue import WEBHOOKS_TASK, get_celery
from models.webhook import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SUCCEEDED,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from models.webhook_signing import post
from worker.periodic import PeriodicThread

log = logging.getLogger(__name__)
# How long a sender holds a claimed delivery before another may take it over (a sender that died).
CLAIM_SECONDS = 120


def backoff_seconds(attempts: int) -> float:
    settings = get_settings()
    return min(settings.webhook_retry_base_seconds * 2 ** max(attempts - 1, 0), settings.webhook_retry_max_seconds)


def _claim(delivery_id: str) -> int | None:
    """Take a due delivery for this sender; return its attempt number, or None if another sender has it."""
    now = utcnow()
    with session_scope() as session:
        attempts = session.scalar(select(WebhookDelivery.attempts).where(WebhookDelivery.id == delivery_id))
        if attempts is None:
            return None
        claimed = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == DELIVERY_PENDING,
                WebhookDelivery.attempts == attempts,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
            )
            .values(attempts=attempts + 1, locked_until=now + timedelta(seconds=CLAIM_SECONDS), last_attempt_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
    return attempts + 1 if claimed == 1 else None


def deliver(delivery_id: str) -> str | None:
    """Make one attempt at a due delivery; return its new status, or None if it was not ours to send."""
    attempt = _claim(delivery_id)
    if attempt is None:
        return None
    with session_scope() as session:
        row = session.execute(
            select(WebhookEndpoint.url, WebhookEndpoint, WebhookEvent.id, WebhookEvent.payload)
            .join(WebhookDelivery, WebhookDelivery.endpoint_id == WebhookEndpoint.id)
            .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one_or_none()
        if row is None:  # the endpoint was deleted meanwhile
            return None
        url, endpoint, event_id, payload = row
        secrets = endpoint.active_secrets()

    status_code, error, permanent = None, None, False
    try:
        response = post(url, secrets, event_id, payload)
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"HTTP {status_code}: {response.text[:300]}"
    except UnsafeDestination as exc:
        error, permanent = exc.message, True
    except httpx.HTTPError as exc:
        error = f"{exc.__class__.__name__}: {exc}"[:500]

    settings = get_settings()
    now = utcnow()
    values: dict = {"last_status_code": status_code, "last_error": error, "locked_until": None}
    if error is None:
        values |= {"status": DELIVERY_SUCCEEDED, "delivered_at": now}
    elif permanent or attempt >= settings.webhook_max_attempts:
        values |= {"status": DELIVERY_FAILED}
    else:
        values |= {"next_attempt_at": now + timedelta(seconds=backoff_seconds(attempt))}
    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    status = values.get("status", DELIVERY_PENDING)
    log.info(
        "webhook delivery %s attempt %d: %s",
        delivery_id,
        attempt,
        status if error is None else f"{status} ({error})",
        extra={"delivery_id": delivery_id, "event_id": event_id, "status_code": status_code},
    )
    return status


def send_due(limit: int = 100) -> dict[str, int]:
    """Send every delivery that is due now (up to `limit`); returns counts by outcome."""
    now = utcnow()
    with session_scope() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DELIVERY_PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).all()
    counts = {DELIVERY_SUCCEEDED: 0, DELIVERY_PENDING: 0, DELIVERY_FAILED: 0}
    for delivery_id in due:
        status = deliver(delivery_id)
        if status is not None:
            counts[status] += 1
    return counts


app = get_celery()


@app.task(name=WEBHOOKS_TASK, acks_late=False, ignore_result=True)
def send_due_webhooks() -> dict[str, int]:
    """Run by the beat every webhook interval: attempts due deliveries, retries included."""
    return send_due()


class WebhookSenderThread(PeriodicThread):
    """Sends due deliveries periodically inside a long-lived process (the embedded API)."""

    def __init__(self, interval: float | None = None):
        super().__init__("webhook-sender", interval or get_settings().webhook_interval_seconds, send_due)

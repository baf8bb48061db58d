"""Webhook endpoints, the events they receive, and each delivery of an event to an endpoint.

A job's terminal transition writes its webhook event and one pending delivery per subscribed endpoint
in the same transaction as the status change (`record_job_outcome`, called by models.transitions). No
network call happens there: deliveries are sent later by worker/webhooks.py, so an event is never lost
to a crash and never sent for a transition that rolled back.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.base import Base, UTCDateTime, unix, utcnow
from models.ids import new_id
from models.job_kind import JobKind
from models.job_status import JobStatus

# The object named in the event type for each job kind: "fine_tuning.job.succeeded" is OpenAI's; the
# others are Grove's own, shaped the same way.
EVENT_OBJECT_FOR_KIND = {
    JobKind.fine_tune: "fine_tuning.job",
    JobKind.export: "export.job",
    JobKind.evaluation: "evaluation.job",
    JobKind.sweep: "sweep.job",
}
OUTCOMES = ("succeeded", "failed", "cancelled")
EVENT_TYPES = tuple(f"{obj}.{outcome}" for obj in EVENT_OBJECT_FOR_KIND.values() for outcome in OUTCOMES)

DELIVERY_PENDING = "pending"
DELIVERY_SUCCEEDED = "succeeded"
DELIVERY_FAILED = "failed"


def event_type_for(kind: str, status: JobStatus | str) -> str:
    return f"{EVENT_OBJECT_FOR_KIND.get(kind, f'{kind}.job')}.{status}"


def new_signing_secret() -> str:
    """Standard Webhooks' format, which OpenAI's SDK verifies: "whsec_" + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class WebhookEndpoint(Base):
    """A URL of a project's that receives signed events. The secret is kept to sign with; it is shown once."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_project_id_id", "project_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whep"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list] = mapped_column(JSON, default=list)
    signing_secret: Mapped[str] = mapped_column(String(100))
    # After a rotation that keeps the old secret for a while, deliveries carry both signatures.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def secret_hint(self) -> str:
        return f"whsec_...{self.signing_secret[-4:]}"

    def active_secrets(self) -> list[str]:
        secrets_ = [self.signing_secret]
        if self.previous_secret and self.previous_secret_expires_at and self.previous_secret_expires_at > utcnow():
            secrets_.append(self.previous_secret)
        return secrets_


class WebhookEvent(Base):
    """One event as sent: its payload is fixed when the job finishes, whatever happens to the job later."""

    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evt"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """An event on its way to one endpoint: the outbox row, and afterwards the record of how it went."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("whdel"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=DELIVERY_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A sender holds a delivery until then; another sender may take it over once it has passed.
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def event_payload(event_id: str, event_type: str, created_at: datetime, data: dict) -> dict:
    """OpenAI's webhook event shape."""
    return {"object": "event", "id": event_id, "type": event_type, "created_at": unix(created_at), "data": data}


def enqueue_event(session: Session, project_id: str, event_type: str, data: dict, job_id: str | None = None) -> int:
    """Write the event and a pending delivery for each endpoint of the project subscribed to its type.

    Database writes only, in the caller's transaction. Returns how many deliveries were queued; with no
    subscribed endpoint nothing is written at all.
    """
    endpoints = [
        endpoint_id
        for endpoint_id, types in session.execute(
            select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(WebhookEndpoint.project_id == project_id)
        )
        if event_type in (types or [])
    ]
    if not endpoints:
        return 0
    now = utcnow()
    event = WebhookEvent(id=new_id("evt"), project_id=project_id, type=event_type, job_id=job_id, created_at=now)
    event.payload = event_payload(event.id, event_type, now, data)
    session.add(event)
    session.flush()  # the deliveries reference it
    for endpoint_id in endpoints:
        session.add(WebhookDelivery(endpoint_id=endpoint_id, event_id=event.id, next_attempt_at=now))
    return len(endpoints)


def record_job_outcome(session: Session, job_id: str, status: JobStatus) -> int:
    """Hook for models.transitions: queue `<object>.<status>` webhooks when a job reaches a terminal state."""
    from models.job import Job

    row = session.execute(select(Job.project_id, Job.kind).where(Job.id == job_id)).one_or_none()
    if row is None:
        return 0
    project_id, kind = row
    return enqueue_event(session, project_id, event_type_for(kind, status), {"id": job_id}, job_id=job_id)

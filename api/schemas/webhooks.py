"""Webhook endpoint objects, shaped like OpenAI's (`client.webhooks.*` of the OpenAI SDK works unchanged)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.base import unix
from models.request_body import RequestBody
from models.webhook import DELIVERY_PENDING, WebhookDelivery, WebhookEndpoint, WebhookEvent


class CreateWebhookEndpoint(RequestBody):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str] = Field(
        min_length=1, max_length=64, description="Event types that trigger deliveries (GET /v1/webhook_event_types)."
    )
    name: str = Field(min_length=1, max_length=200, description="A human-readable name.")
    url: str = Field(min_length=1, max_length=2048, description="Where deliveries are POSTed.")


class UpdateWebhookEndpoint(RequestBody):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str] | None = Field(None, min_length=1, max_length=64, description="The complete new set.")
    name: str | None = Field(None, min_length=1, max_length=200)
    url: str | None = Field(None, min_length=1, max_length=2048)


class RotateSecret(RequestBody):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = Field(
        False, description="Sign with both secrets for 24 hours, so receivers can switch without dropping events."
    )


class TestWebhookEndpoint(RequestBody):
    model_config = ConfigDict(extra="forbid")

    event_type: str = Field(description="The event type of the sample event sent.")


class WebhookEndpointObject(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    event_types: list[str]
    name: str
    signing_secret_hint: str
    url: str
    updated_at: int

    @classmethod
    def from_row(cls, endpoint: WebhookEndpoint) -> WebhookEndpointObject:
        return cls(
            id=endpoint.id,
            created_at=unix(endpoint.created_at),
            event_types=list(endpoint.event_types or []),
            name=endpoint.name,
            signing_secret_hint=endpoint.secret_hint,
            url=endpoint.url,
            updated_at=unix(endpoint.updated_at),
        )


class WebhookEndpointWithSecretObject(WebhookEndpointObject):
    signing_secret: str = Field(description="Shown only at creation and after a rotation.")

    @classmethod
    def from_row(cls, endpoint: WebhookEndpoint) -> WebhookEndpointWithSecretObject:
        return cls(**WebhookEndpointObject.from_row(endpoint).model_dump(), signing_secret=endpoint.signing_secret)


class DeletedWebhookEndpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookEndpointTestResult(BaseModel):
    event_type: str
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    status_code: int
    success: Literal[True] = True
    webhook_endpoint_id: str


class WebhookEventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[str]


class WebhookDeliveryObject(BaseModel):
    """Grove extension: one event's delivery to one endpoint, with its attempts so far."""

    id: str
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    webhook_endpoint_id: str
    event_id: str
    event_type: str
    event: dict = Field(description="The payload as sent.")
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    created_at: int
    last_attempt_at: int | None
    next_attempt_at: int | None = Field(description="When the next attempt is due; null once settled.")
    delivered_at: int | None
    response_status_code: int | None
    error: str | None

    @classmethod
    def from_row(cls, delivery: WebhookDelivery, event: WebhookEvent) -> WebhookDeliveryObject:
        return cls(
            id=delivery.id,
            webhook_endpoint_id=delivery.endpoint_id,
            event_id=event.id,
            event_type=event.type,
            event=event.payload,
            status=delivery.status,
            attempts=delivery.attempts,
            created_at=unix(delivery.created_at),
            last_attempt_at=unix(delivery.last_attempt_at),
            next_attempt_at=unix(delivery.next_attempt_at) if delivery.status == DELIVERY_PENDING else None,
            delivered_at=unix(delivery.delivered_at),
            response_status_code=delivery.last_status_code,
            error=delivery.last_error,
        )

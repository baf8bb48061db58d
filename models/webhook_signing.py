"""Webhook signing and the one POST to a checked destination, shared by the sender (worker/webhooks.py) and the
API's test delivery.

Signing follows Standard Webhooks, as OpenAI's webhooks do (so `client.webhooks.unwrap()` of the
OpenAI SDK verifies Grove's deliveries): headers `webhook-id` (the event id, the same on every retry),
`webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 over
"{webhook-id}.{webhook-timestamp}.{body}">`, keyed by the base64-decoded part of the `whsec_` secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import httpx

from models.config import get_settings
from models.destinations import resolve_destination

USER_AGENT = "Grove-Webhooks/1"


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode()
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secrets: list[str], message_id: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(s, message_id, timestamp, body) for s in secrets),
    }


def post(url: str, secrets: list[str], message_id: str, payload: dict) -> httpx.Response:
    """Check the destination, then POST the signed payload to the address that was checked."""
    destination = resolve_destination(url)
    body = json.dumps(payload, separators=(",", ":"))
    headers = signed_headers(secrets, message_id, body) | {"host": destination.host_header}
    extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
    with httpx.Client(timeout=get_settings().webhook_timeout_seconds, follow_redirects=False, trust_env=False) as c:
        return c.post(destination.request_url(), content=body.encode(), headers=headers, extensions=extensions)

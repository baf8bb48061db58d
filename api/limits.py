"""Request limits enforced before a route runs: the size of a JSON body, and a per-key rate limit; and the
closing of an upload's connection when it is answered before its body was read.

- Uploads (`POST /v1/files`) are held to GROVE_MAX_UPLOAD_BYTES by the route itself, after the key is checked
  and as the bytes arrive (api/upload_form.py). An upload answered before its body was read in full (401,
  403, 413, 400) gets `Connection: close` (`CloseUnreadUploads`): the server then stops reading, where it
  would otherwise go on receiving, and discarding, all that the client still sends.
- JSON bodies: a request body (any route but the upload) larger than GROVE_MAX_JSON_BODY_BYTES gets 413
  `request_too_large`: at once when its Content-Length says so, else as soon as the bytes received pass the
  limit (chunked bodies are buffered up to the limit, never beyond).
- Rate: with GROVE_RATE_LIMIT set (limits notation: "100/second", "6000 per minute; 200 per second"), each
  key may make that many requests; past it the answer is 429 `rate_limit_exceeded` with Retry-After. The
  counters live in Redis when the broker is Redis (shared by every API process), else in process memory.
  A key is identified by its sha256, as it is stored; the key itself never reaches the counter store.
  The limiter is the `limits` library (moving or fixed window).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time

from limits import RateLimitItem, parse_many
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from models.config import Settings, get_settings
from models.errors import PayloadTooLarge, RateLimited

log = logging.getLogger(__name__)

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
UPLOAD_PATH = "/v1/files"


def limiter_storage_url(settings: Settings) -> str:
    """Where the counters live: GROVE_RATE_LIMIT_STORAGE_URL, else the broker's Redis, else process memory."""
    url = settings.rate_limit_storage_url or settings.broker_url
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        return f"async+{url}"
    if url.startswith(("async+", "memory://")):
        return url if url.startswith("async+") else f"async+{url}"
    return "async+memory://"


class _Limiter:
    """One configured limiter, bound to the event loop it was built in (redis.asyncio clients are)."""

    def __init__(self, settings: Settings):
        self.config = (settings.rate_limit, settings.rate_limit_strategy, limiter_storage_url(settings))
        self.items: list[RateLimitItem] = parse_many(settings.rate_limit)
        url = self.config[2]
        options = {"implementation": "redispy", "key_prefix": "grove-rate"} if "redis" in url else {}
        storage = storage_from_string(url, **options)
        moving = settings.rate_limit_strategy == "moving-window"
        self.limiter: RateLimiter = (MovingWindowRateLimiter if moving else FixedWindowRateLimiter)(storage)
        self.loop = asyncio.get_running_loop()

    async def retry_after(self, identity: str) -> int | None:
        """Count one request; None when it is allowed, else the seconds until the first limit hit frees up."""
        for item in self.items:
            if not await self.limiter.hit(item, identity):
                reset_time, _ = await self.limiter.get_window_stats(item, identity)
                return max(1, math.ceil(reset_time - time.time()))
        return None


class CloseUnreadUploads:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        body_read = False

        async def watched_receive() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watched_receive, closing_send)


class RequestLimits:
    def __init__(self, app: ASGIApp):
        self.app = app
        self._limiter: _Limiter | None = None

    def _current_limiter(self, settings: Settings) -> _Limiter | None:
        if not settings.rate_limit:
            return None
        wanted = (settings.rate_limit, settings.rate_limit_strategy, limiter_storage_url(settings))
        limiter = self._limiter
        if limiter is None or limiter.config != wanted or limiter.loop is not asyncio.get_running_loop():
            limiter = self._limiter = _Limiter(settings)
        return limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        headers = dict(scope["headers"])

        limiter = self._current_limiter(settings)
        if limiter is not None:
            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                identity = hashlib.sha256(key.strip().encode()).hexdigest()
                try:
                    wait = await limiter.retry_after(identity)
                except Exception as exc:  # the counter store is down: serve rather than refuse everyone
                    log.warning("rate limiter unavailable, request not counted: %s", exc)
                    wait = None
                if wait is not None:
                    error = RateLimited(
                        f"Rate limit of {settings.rate_limit} requests per key exceeded (GROVE_RATE_LIMIT); "
                        f"retry after {wait} s."
                    )
                    await error_response(error, headers={"retry-after": str(wait)})(scope, receive, send)
                    return

        if scope["method"] in BODY_METHODS and scope["path"].rstrip("/") != UPLOAD_PATH:
            limit = settings.max_json_body_bytes
            length = headers.get(b"content-length")
            if length is not None:
                if length.isdigit() and int(length) > limit:
                    await self._too_large(int(length), limit, scope, receive, send)
                    return
            elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                body, more = await self._read_up_to(receive, limit)
                if more:
                    await self._too_large(None, limit, scope, receive, send)
                    return
                receive = self._replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def _read_up_to(receive: Receive, limit: int) -> tuple[bytes, bool]:
        """The body if it fits in `limit` bytes, and whether it did not (then reading stops at the limit)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _too_large(length: int | None, limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        size = f"of {length} bytes " if length is not None else ""
        error = PayloadTooLarge(
            f"Request body {size}exceeds the limit of {limit} bytes for JSON requests (GROVE_MAX_JSON_BODY_BYTES).",
            code="request_too_large",
        )
        # The rest of the body is not read: the connection cannot be reused.
        await error_response(error, headers={"connection": "close"})(scope, receive, send)

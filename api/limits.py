"""Request limits enforced around a route: the size of a JSON body, and rate limits; and the closing of an
upload's connection when it is answered before its body was read.

- Uploads (`POST /v1/files`, an upload's parts, `POST /v1/uploads/{id}/parts`, and a base model's archive,
  `POST /v1/models`) are held to GROVE_MAX_UPLOAD_BYTES (a part: GROVE_MAX_UPLOAD_PART_BYTES; a model:
  GROVE_MAX_MODEL_UPLOAD_BYTES) by the route itself, after the key is checked
  and as the bytes arrive (api/upload_form.py). An upload answered before its body was read in full (401,
  403, 413, 400) gets `Connection: close` (`CloseUnreadUploads`): the server then stops reading, where it
  would otherwise go on receiving, and discarding, all that the client still sends.
- JSON bodies: a request body (any route but the upload) larger than GROVE_MAX_JSON_BODY_BYTES gets 413
  `request_too_large`: at once when its Content-Length says so, else as soon as the bytes received pass the
  limit (chunked bodies are buffered up to the limit, never beyond).
- Rates (limits notation: "1200/minute", "6000 per minute; 200 per second"; past one, 429
  `rate_limit_exceeded` with Retry-After), three counters:
  - GROVE_RATE_LIMIT, per valid key, counted under the key's sha256 (as it is stored; the key itself never
    reaches the counter store);
  - GROVE_ADDRESS_RATE_LIMIT, per client address, for requests without a valid key (none, unknown, revoked,
    or a public route such as /readyz): presenting made-up keys buys no fresh allowance;
  - GROVE_AUTH_FAILURE_RATE_LIMIT, per client address, for keys that fail authentication: past it such a
    request gets 429 instead of 401, while a valid key from the same address keeps working.
  The client address is the peer's; X-Forwarded-For is read only from GROVE_TRUSTED_PROXIES.

Which counter a request goes to depends on its key being valid, which only the database knows. Checking
it here would add a database round trip to every request, so the auth dependency (api/deps.py) records
each key it verified in `verified_keys`, a short-lived in-process set that only picks the counter and
never admits anyone:
  - a key verified in the last minute: its counter is hit before the route runs (the polling fast path:
    one round trip to the counter store, Redis when the broker is Redis, shared by every API process);
  - no key: the address counter, before the route runs;
  - any other key: the route runs (the dependency checks the key), and when the answer starts the request
    is counted: per key if the key proved valid (never refused then: the route has done its work), else per
    address, and as a failure on a 401; over either, the answer is replaced by the 429.
The limiter is the `limits` library (moving or fixed window). A counter store that fails lets requests through.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from functools import lru_cache

from limits import RateLimitItem, parse_many
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from limits.storage import storage_from_string
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from models.config import Settings, get_settings
from models.errors import PayloadTooLarge, RateLimited

log = logging.getLogger(__name__)

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# The routes that read their multipart body themselves, held to the upload limits rather than the JSON one.
UPLOAD_PATHS = re.compile(r"^/v1/(files|uploads/[^/]+/parts|models)$")
VERIFIED_KEY_SECONDS = 60.0


def limiter_storage_url(settings: Settings) -> str:
    """Where the counters live: GROVE_RATE_LIMIT_STORAGE_URL, else the broker's Redis, else process memory."""
    url = settings.rate_limit_storage_url or settings.broker_url
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        return f"async+{url}"
    if url.startswith(("async+", "memory://")):
        return url if url.startswith("async+") else f"async+{url}"
    return "async+memory://"


def is_upload(scope: Scope) -> bool:
    """A file upload or an upload's part: a POST whose body the route reads and bounds itself."""
    return scope["method"] == "POST" and UPLOAD_PATHS.match(scope["path"].rstrip("/")) is not None


def configured(rate: str | None) -> str | None:
    """The rate, or None when the setting turns it off (unset, empty, 'off')."""
    return rate if rate and rate.strip().lower() not in ("off", "none") else None


@lru_cache(maxsize=32)
def _items(rate: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(rate))


class VerifiedKeys:
    """sha256es of keys the database confirmed in the last VERIFIED_KEY_SECONDS, most recent last; bounded."""

    def __init__(self, size: int = 100_000):
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()  # the auth dependency runs in worker threads

    def add(self, key_hash: str) -> None:
        with self._lock:
            self._seen[key_hash] = time.monotonic()
            self._seen.move_to_end(key_hash)
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def discard(self, key_hash: str) -> None:
        with self._lock:
            self._seen.pop(key_hash, None)

    def __contains__(self, key_hash: str) -> bool:
        seen = self._seen.get(key_hash)
        return seen is not None and time.monotonic() - seen < VERIFIED_KEY_SECONDS


verified_keys = VerifiedKeys()


def presented_key_hash(headers: dict[bytes, bytes]) -> str | None:
    """The sha256 of the bearer key the request presents, or None when it presents none."""
    scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return hashlib.sha256(key.strip().encode()).hexdigest()


@lru_cache(maxsize=8)
def _networks(trusted: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in trusted.split(",") if part.strip())


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def client_address(scope: Scope, headers: dict[bytes, bytes], trusted_proxies: str) -> str:
    """Who the address counters count: the peer, or, when the peer is a trusted proxy, the nearest address in
    X-Forwarded-For that is not one. An IPv6 client counts as its /64, which one host can hold whole."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    address = _ip(peer)
    trusted = _networks(trusted_proxies)
    if address is not None and trusted and any(address in network for network in trusted):
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1").split(",")
        for hop in reversed([_ip(part) for part in forwarded]):
            if hop is None:
                break  # a hop that is no address: trust nothing beyond it
            address = hop
            if not any(hop in network for network in trusted):
                break
    if address is None:
        return peer
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class _Limiter:
    """The counter store and strategy, bound to the event loop it was built in (redis.asyncio clients are)."""

    def __init__(self, settings: Settings):
        self.config = (settings.rate_limit_strategy, limiter_storage_url(settings))
        url = self.config[1]
        options = {"implementation": "redispy", "key_prefix": "grove-rate"} if "redis" in url else {}
        if url.startswith(("async+redis://", "async+rediss://")):
            # The limits are on by default: an unreachable store must not hold every request for long.
            options |= {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
        storage = storage_from_string(url, **options)
        moving = settings.rate_limit_strategy == "moving-window"
        self.limiter: RateLimiter = (MovingWindowRateLimiter if moving else FixedWindowRateLimiter)(storage)
        self.loop = asyncio.get_running_loop()

    async def retry_after(self, rate: str | None, identity: str) -> int | None:
        """Count one request against `rate`; None when it is allowed (or `rate` is off, or the store is down),
        else the seconds until the first limit hit frees up."""
        if rate is None:
            return None
        try:
            for item in _items(rate):
                if not await self.limiter.hit(item, identity):
                    reset_time, _ = await self.limiter.get_window_stats(item, identity)
                    return max(1, math.ceil(reset_time - time.time()))
        except Exception as exc:  # the counter store is down: serve rather than refuse everyone
            log.warning("rate limiter unavailable, request not counted: %s", exc)
        return None


def _refusal(setting: str, rate: str, counted: str, wait: int) -> RateLimited:
    return RateLimited(f"Rate limit of {rate} {counted} exceeded ({setting}); retry after {wait} s.")


Refusal = tuple[RateLimited, int]


async def _count(limiter: _Limiter, settings: Settings, key_hash: str | None, address: str) -> Refusal | None:
    """Count a request of a valid key (`key_hash`) or one without a valid key (None), and refuse it or not."""
    if key_hash is not None:
        rate = configured(settings.rate_limit)
        wait = await limiter.retry_after(rate, f"key:{key_hash}")
        return None if wait is None else (_refusal("GROVE_RATE_LIMIT", rate, "requests per key", wait), wait)
    rate = configured(settings.address_rate_limit)
    wait = await limiter.retry_after(rate, f"address:{address}")
    counted = "requests without a valid API key per client address"
    return None if wait is None else (_refusal("GROVE_ADDRESS_RATE_LIMIT", rate, counted, wait), wait)


async def _count_failure(limiter: _Limiter, settings: Settings, address: str) -> Refusal | None:
    rate = configured(settings.auth_failure_rate_limit)
    wait = await limiter.retry_after(rate, f"auth-failure:{address}")
    if wait is None:
        return None
    error = _refusal("GROVE_AUTH_FAILURE_RATE_LIMIT", rate, "failed authentications per client address", wait)
    error.message += " Valid keys are not affected."
    return error, wait


async def _refuse(error: RateLimited, wait: int, close: bool, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"retry-after": str(wait)} | ({"connection": "close"} if close else {})
    await error_response(error, headers=headers)(scope, receive, send)


def _counted_when_answered(
    limiter: _Limiter, settings: Settings, key_hash: str, address: str, scope: Scope, receive: Receive, send: Send
) -> Send:
    """A `send` that counts the request once its route has checked the key (see the module's docstring)."""
    replaced = False

    async def counting_send(message: Message) -> None:
        nonlocal replaced
        if replaced:
            return
        if message["type"] == "http.response.start":
            if key_hash in verified_keys:
                await _count(limiter, settings, key_hash, address)  # counted, not refused: the route has run
            else:
                refusals = [await _count(limiter, settings, None, address)]
                if message["status"] == 401:
                    refusals.append(await _count_failure(limiter, settings, address))
                refusal = max((r for r in refusals if r is not None), key=lambda r: r[1], default=None)
                if refusal is not None:
                    replaced = True
                    close = any(k.lower() == b"connection" for k, _ in message.get("headers", []))
                    await _refuse(*refusal, close, scope, receive, send)
                    return
        await send(message)

    return counting_send


class CloseUnreadUploads:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_upload(scope):
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
        rates = (settings.rate_limit, settings.address_rate_limit, settings.auth_failure_rate_limit)
        if not any(configured(rate) for rate in rates):
            return None
        wanted = (settings.rate_limit_strategy, limiter_storage_url(settings))
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
            key_hash = presented_key_hash(headers)
            address = client_address(scope, headers, settings.trusted_proxies)
            if key_hash is None or key_hash in verified_keys:
                refusal = await _count(limiter, settings, key_hash, address)
                if refusal is not None:
                    close = scope["method"] in BODY_METHODS  # the body is left unread
                    await _refuse(*refusal, close, scope, receive, send)
                    return
            else:
                send = _counted_when_answered(limiter, settings, key_hash, address, scope, receive, send)

        if scope["method"] in BODY_METHODS and not is_upload(scope):
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

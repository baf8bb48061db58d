"""Per-request observability: a request id, one structured log line, and Prometheus latency histograms.

The request id is taken from an incoming `X-Request-ID` (if it looks like an id) or generated, set in the
logging context for every line logged while serving the request, and sent back as `X-Request-ID`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.logs import request_id_var

log = logging.getLogger("grove.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

HTTP_LATENCY = Histogram(
    "grove_http_request_duration_seconds",
    "Time to answer an HTTP request (until its last byte), by route template, method and status.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
HTTP_REQUESTS = Counter(
    "grove_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["method", "route", "status"],
)
EVENT_STREAMS = Gauge("grove_event_streams_open", "Server-Sent Event streams open now.", multiprocess_mode="livesum")


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestObservability:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        state = {"status": 500, "stream": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                headers = list(message.get("headers", []))
                state["stream"] = any(
                    k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                if state["stream"]:
                    EVENT_STREAMS.inc()
                message["headers"] = headers + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            status = str(state["status"])
            method = scope["method"]
            if state["stream"]:
                EVENT_STREAMS.dec()
            else:
                # A stream lasts as long as its job: it would only blur the latency of everything else.
                HTTP_LATENCY.labels(method, route, status).observe(elapsed)
            HTTP_REQUESTS.labels(method, route, status).inc()
            if route != "/metrics":
                log.info(
                    "%s %s %s",
                    method,
                    scope["path"],
                    status,
                    extra={
                        "method": method,
                        "path": scope["path"],
                        "route": route,
                        "status": int(status),
                        "duration_ms": round(elapsed * 1000, 1),
                        "job_id": (scope.get("path_params") or {}).get("job_id"),
                    },
                )
            request_id_var.reset(token)

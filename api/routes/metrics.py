"""GET /metrics: Prometheus exposition of the API's own metrics plus the service-wide ones.

With several API processes (uvicorn --workers N) set PROMETHEUS_MULTIPROC_DIR to an empty directory
shared by them: each process then writes its HTTP metrics there and every scrape adds them all up.

The service-wide metrics name every project's job counts and the workers' host names: with
GROVE_METRICS_REQUIRE_ADMIN on, a scrape must send an admin key (401 without a key, 403 with a project key).
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from api.deps import get_admin_key
from api.services.metrics import GroveCollector
from models.config import get_settings
from models.db import get_read_sessionmaker

router = APIRouter(tags=["operations"])


def _process_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    # Checked in the body, not as a dependency: the route stays keyless when the option is off.
    if get_settings().metrics_require_admin:
        with get_read_sessionmaker()() as session:
            get_admin_key(request, session)
    service = CollectorRegistry()
    service.register(GroveCollector())
    body = generate_latest(_process_registry()) + generate_latest(service)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

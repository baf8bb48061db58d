"""GET /metrics: Prometheus exposition of the API's own metrics plus the service-wide ones.

With several API processes (uvicorn --workers N) set PROMETHEUS_MULTIPROC_DIR to an empty directory
shared by them: each process then writes its HTTP metrics there and every scrape adds them all up.
"""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from api.services.metrics import GroveCollector

router = APIRouter(tags=["operations"])


def _process_registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    service = CollectorRegistry()
    service.register(GroveCollector())
    body = generate_latest(_process_registry()) + generate_latest(service)
    return Response(body, media_type=CONTENT_TYPE_LATEST)

"""The FastAPI application: routers, the error envelope, and the request-level middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api.deps import read_limiter
from api.errors import install_error_handlers
from api.limits import CloseUnreadUploads, RequestLimits
from api.observability import RequestObservability
from api.query import refuse_unknown_query
from api.routes import (
    checkpoint_permissions,
    evaluations,
    exports,
    files,
    fine_tuning,
    health,
    keys,
    metrics,
    models,
    page,
    sweeps,
    uploads,
    webhooks,
)
from models.config import get_settings
from models.logs import configure_logging
from models.storage import get_storage
from worker.reconcile import ReconcilerThread
from worker.webhooks import WebhookSenderThread


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.read_limiter = read_limiter()
    reconciler = ReconcilerThread() if get_settings().run_reconciler else None
    if reconciler:
        reconciler.start()
    webhook_sender = WebhookSenderThread() if get_settings().run_webhook_sender else None
    if webhook_sender:
        webhook_sender.start()
    yield
    if reconciler:
        reconciler.stop()
    if webhook_sender:
        webhook_sender.stop()


def create_app() -> FastAPI:
    configure_logging()
    get_storage().ensure()
    app = FastAPI(
        lifespan=lifespan,
        title="Grove",
        version="0.1.0",
        description="Self-hosted fine-tuning service with an OpenAI-compatible API.",
        dependencies=[Depends(refuse_unknown_query)],
    )
    install_error_handlers(app)
    routers = (health, files, uploads, fine_tuning, checkpoint_permissions, models, exports, evaluations, sweeps)
    for module in (*routers, webhooks, keys, metrics, page):
        app.include_router(module.router)
    app.add_middleware(CloseUnreadUploads)  # an upload answered before its body was read (api/limits.py)
    app.add_middleware(RequestLimits)  # JSON body size and the per-key rate limit (api/limits.py)
    app.add_middleware(RequestObservability)
    return app

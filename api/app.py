"""The FastAPI application: routers, the error envelope, and an early upload-size check."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import read_limiter
from api.errors import error_response, install_error_handlers
from api.limits import RequestLimits
from api.observability import RequestObservability
from api.routes import (
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
    webhooks,
)
from models.config import get_settings
from models.errors import PayloadTooLarge
from models.logs import configure_logging
from models.storage import get_storage
from worker.reconcile import ReconcilerThread
from worker.webhooks import WebhookSenderThread

# Room for the multipart boundaries and the form's other fields.
MULTIPART_OVERHEAD = 64 * 1024


class UploadLimit:
    """Refuse an upload whose declared length is over the limit before its body is read.

    Bodies without a Content-Length are still counted byte by byte as they are stored.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            limit = get_settings().max_upload_bytes
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
                response = error_response(
                    PayloadTooLarge(f"File exceeds the upload limit of {limit} bytes.", param="file"),
                    headers={"connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    )
    install_error_handlers(app)
    for module in (health, files, fine_tuning, models, exports, evaluations, sweeps, webhooks, keys, metrics, page):
        app.include_router(module.router)
    app.add_middleware(UploadLimit)
    app.add_middleware(RequestLimits)  # JSON body size and the per-key rate limit (api/limits.py)
    app.add_middleware(RequestObservability)
    return app

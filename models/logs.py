"""Structured logs: one JSON object per line, with the request id and the job id on every line.

`configure_logging()` is called by the API app factory and by the Celery worker (its setup_logging
signal, so Celery leaves logging to us). The ids come from context variables: the API's request
middleware sets the request id, the worker's task signals set the job id of the job task it runs, and a
lease heartbeat thread ("lease-<job id>") is recognised by its name. GROVE_LOG_FORMAT=text gives
human-readable lines with the same fields.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str | None] = ContextVar("grove_request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("grove_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_HANDLER_NAME = "grove"


class ContextFilter(logging.Filter):
    """Stamps request_id and job_id on every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            job_id = job_id_var.get()
            if job_id is None and record.threadName and record.threadName.startswith("lease-"):
                job_id = record.threadName.removeprefix("lease-")
            record.job_id = job_id
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [request=%(request_id)s job=%(job_id)s] %(message)s"


def configure_logging(log_format: str | None = None, level: str | None = None) -> None:
    """Route every logger (uvicorn's and Celery's too) to one handler on the root logger. Idempotent."""
    from models.config import get_settings

    settings = get_settings()
    log_format = (log_format or settings.log_format).lower()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
    # uvicorn and Celery install handlers of their own; send their records through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # The API logs each request itself (api/observability.py), with its id and duration.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


@contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)

"""The Celery app (configuration only) and dispatch after commit.

The API imports this to send messages by task name without importing torch; the worker registers the
tasks on the same app (worker/tasks.py).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from models.base import utcnow
from models.config import get_settings
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus

log = logging.getLogger(__name__)

# A sweep has no task: no worker runs it, the reconciler advances it (worker/sweep.py).
TASK_FOR_KIND = {
    JobKind.fine_tune: "grove.fine_tune",
    JobKind.export: "grove.export",
    JobKind.evaluation: "grove.evaluation",
}
RECONCILE_TASK = "grove.reconcile"
WEBHOOKS_TASK = "grove.send_webhooks"


def _transport_options(broker_url: str, visibility_timeout: int) -> dict:
    if broker_url.startswith(("redis", "rediss", "sentinel")):
        # Redis redelivers an unacknowledged message after this long; keep it above the longest job.
        return {"visibility_timeout": visibility_timeout}
    if broker_url.startswith("sqla+sqlite"):
        # kombu hands these to create_engine: wait out the API and worker briefly locking the file.
        return {"connect_args": {"timeout": 30}}
    return {}


@lru_cache
def get_celery() -> Celery:
    settings = get_settings()
    app = Celery("grove", broker=settings.broker_url)
    app.conf.update(
        # A message is acknowledged only after its task returns, and given back if the worker dies;
        # the job lease (not the broker) is what stops a second delivery from running the job twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings.broker_url, settings.visibility_timeout_seconds),
        task_default_queue=settings.fine_tune_queue,
        task_routes={
            TASK_FOR_KIND[JobKind.fine_tune]: {"queue": settings.fine_tune_queue},
            # The beat's periodic tasks go to a queue that a CPU worker serves, never behind a long job.
            RECONCILE_TASK: {"queue": settings.maintenance_queue},
            WEBHOOKS_TASK: {"queue": settings.maintenance_queue},
        },
        beat_schedule={
            # A tick nobody took in time is dropped, not piled up: the next one does the same work.
            "reconcile": {
                "task": RECONCILE_TASK,
                "schedule": settings.reconcile_interval_seconds,
                "options": {"expires": settings.reconcile_interval_seconds},
            },
            "send-webhooks": {
                "task": WEBHOOKS_TASK,
                "schedule": settings.webhook_interval_seconds,
                "options": {"expires": settings.webhook_interval_seconds},
            },
        },
        worker_hijack_root_logger=False,
    )
    return app


def publish_job(job_id: str, kind: str, queue: str) -> None:
    """Send the job's message and record when it went out. Safe to repeat: the claim is conditional."""
    from models.db import session_scope

    get_celery().send_task(TASK_FOR_KIND[kind], args=[job_id], queue=queue)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(dispatched_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def dispatch_after_commit(session: Session, job_id: str, kind: str, queue: str) -> None:
    """Publish once the session's transaction commits; nothing is sent if it rolls back.

    A publish that fails (broker down) is only logged: the job row is already durable and queued
    with no `dispatched_at`, so the reconciler sends it later.
    """
    pending: list = session.info.setdefault("dispatch_after_commit", [])
    pending.append((job_id, kind, queue))


@event.listens_for(Session, "after_commit")
def _publish_pending(session: Session) -> None:
    pending = session.info.pop("dispatch_after_commit", [])
    for job_id, kind, queue in pending:
        try:
            publish_job(job_id, kind, queue)
        except Exception:
            log.exception("could not publish job %s; the reconciler will re-send it", job_id)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop("dispatch_after_commit", None)

"""Celery entry point: `celery -A worker.celery_app worker -Q fine_tune`."""

from models.queue import get_celery

app = get_celery()

import worker.maintenance  # noqa: E402,F401  (the beat's periodic tasks)
import worker.observability  # noqa: E402,F401  (JSON logs with job ids, heartbeats)
import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)
import worker.webhooks  # noqa: E402,F401  (webhook deliveries)

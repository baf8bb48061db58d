"""Celery entry point: `celery -A worker.celery_app worker -Q fine_tune`."""

from models.queue import get_celery

app = get_celery()

import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)

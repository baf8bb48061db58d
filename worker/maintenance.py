"""Periodic work the beat schedules (models/queue.py beat_schedule) on the maintenance queue."""

from __future__ import annotations

from models.queue import RECONCILE_TASK, get_celery
from worker.reconcile import reconcile_once

app = get_celery()


@app.task(name=RECONCILE_TASK, acks_late=False, ignore_result=True)
def reconcile() -> dict[str, int]:
    """Re-send lost job messages and requeue jobs whose worker died (the API's thread does the same)."""
    return reconcile_once()

"""Celery entry point: `celery -A worker.celery_app worker -Q fine_tune`."""

import logging
import threading
import time

from celery.signals import worker_process_init

from models.config import get_settings
from models.db import get_engine
from models.queue import get_celery

app = get_celery()
log = logging.getLogger("grove.worker")


@worker_process_init.connect
def _fresh_connections_after_fork(**_) -> None:
    # A pool process forked after the parent opened connections (its heartbeat thread) must not share them:
    # two processes on one socket interleave their statements. Drop the inherited pool without closing it.
    get_engine().dispose(close=False)
    if get_settings().preload_training_libraries:
        threading.Thread(target=_import_training_libraries, name="grove-preload", daemon=True).start()


def _import_training_libraries() -> None:
    # A job that needs them meanwhile waits on Python's import lock for what is left, never imports twice.
    started = time.perf_counter()
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    log.info("Training libraries loaded in %.1f s.", time.perf_counter() - started)


import worker.maintenance  # noqa: E402,F401  (the beat's periodic tasks)
import worker.observability  # noqa: E402,F401  (JSON logs with job ids, heartbeats)
import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)
import worker.webhooks  # noqa: E402,F401  (webhook deliveries)

"""Worker-side observability, wired to Celery's signals (worker/celery_app.py imports this module).

- Logging: Celery leaves logging to models.logs (JSON lines); each job task's lines carry its job id.
- Heartbeats for /metrics: each worker upserts its row every few seconds while it runs. A worker that
  dies leaves a row whose `last_seen_at` stops moving; one that stops cleanly removes its row.
"""

from __future__ import annotations

import logging
import os
import threading

from celery.signals import setup_logging, task_postrun, task_prerun, worker_ready, worker_shutdown
from sqlalchemy import delete, update

from models.base import utcnow
from models.db import session_scope
from models.logs import configure_logging, job_id_var
from models.queue import TASK_FOR_KIND
from models.worker_heartbeat import WorkerHeartbeat

log = logging.getLogger(__name__)
INTERVAL_SECONDS = 10.0


class Heartbeat(threading.Thread):
    def __init__(self, hostname: str, queues: list[str], interval: float = INTERVAL_SECONDS):
        super().__init__(name="worker-heartbeat", daemon=True)
        self.hostname, self.queues, self.interval = hostname, queues, interval
        self._stop_event = threading.Event()

    def beat(self) -> None:
        with session_scope() as session:
            now = utcnow()
            updated = session.execute(
                update(WorkerHeartbeat)
                .where(WorkerHeartbeat.hostname == self.hostname)
                .values(last_seen_at=now, queues=self.queues, pid=os.getpid())
                .execution_options(synchronize_session=False)
            ).rowcount
            if not updated:
                session.add(WorkerHeartbeat(hostname=self.hostname, queues=self.queues, pid=os.getpid()))

    def run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:
                log.warning("worker heartbeat failed; retrying", exc_info=True)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        try:
            with session_scope() as session:
                session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.hostname == self.hostname))
        except Exception:
            log.warning("could not remove the heartbeat row of %s", self.hostname, exc_info=True)


_current: Heartbeat | None = None


@worker_ready.connect
def _start(sender=None, **_) -> None:
    global _current
    queues = sorted(q.name for q in sender.task_consumer.queues) if sender and sender.task_consumer else []
    _current = Heartbeat(sender.hostname if sender else "worker", queues)
    _current.start()


@worker_shutdown.connect
def _stop(**_) -> None:
    if _current is not None:
        _current.stop()


@setup_logging.connect
def _setup_logging(**_) -> None:
    configure_logging()


_JOB_TASKS = set(TASK_FOR_KIND.values())


@task_prerun.connect
def _enter_job(task_id=None, task=None, args=None, **_) -> None:
    if task is not None and task.name in _JOB_TASKS and args:
        task.request.grove_log_token = job_id_var.set(str(args[0]))


@task_postrun.connect
def _leave_job(task=None, **_) -> None:
    token = getattr(task.request, "grove_log_token", None) if task is not None else None
    if token is not None:
        job_id_var.reset(token)

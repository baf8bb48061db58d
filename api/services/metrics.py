"""Prometheus metrics read from the database and the broker at scrape time.

Job counts, durations and trained tokens come from the jobs table, so every API process reports the
same numbers whichever worker ran the job; queue depth comes from the broker; worker liveness from the
heartbeat rows the workers write (worker/observability.py). No project label: /metrics is for operators
and reveals no tenant's names or ids.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select, text

from models.base import utcnow
from models.config import get_settings
from models.db import session_scope
from models.job import Job
from models.job_kind import JobKind
from models.job_status import TERMINAL, JobStatus
from models.webhook import WebhookDelivery
from models.worker_heartbeat import WorkerHeartbeat

log = logging.getLogger(__name__)

DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
# A worker that has not written its heartbeat for this long is counted as down.
WORKER_STALE_SECONDS = 60
# kombu's Redis transport keeps prioritised messages in extra lists: "<queue>\x06\x16<priority>".
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)


def _known_queues(session) -> set[str]:
    settings = get_settings()
    queues = {settings.fine_tune_queue, settings.maintenance_queue}
    for name in ("export_cpu_queue", "export_cuda_queue", "evaluation_queue", "sweep_queue"):
        value = getattr(settings, name, None)
        if value:
            queues.add(value)
    queues.update(
        q for (q,) in session.execute(select(Job.queue).where(Job.status.not_in(sorted(TERMINAL))).distinct())
    )
    return queues


def broker_queue_depth(queues: set[str]) -> dict[str, int]:
    """Messages waiting in each queue of the broker (Redis lists, or kombu's SQLAlchemy tables)."""
    url = get_settings().broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            names = sorted(queues)
            pipe = client.pipeline()
            for name in names:
                pipe.llen(name)
                for step in _REDIS_PRIORITY_STEPS:
                    pipe.llen(f"{name}{_REDIS_PRIORITY_SEP}{step}")
            lengths = pipe.execute()
        finally:
            client.close()
        per = 1 + len(_REDIS_PRIORITY_STEPS)
        return {name: sum(lengths[i * per : (i + 1) * per]) for i, name in enumerate(names)}
    if url.startswith("sqla+"):
        from sqlalchemy import create_engine

        engine = create_engine(url.removeprefix("sqla+"))
        try:
            with engine.connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT q.name, count(m.id) FROM kombu_queue q LEFT JOIN kombu_message m "
                        "ON m.queue_id = q.id AND m.visible GROUP BY q.name"
                    )
                ).all()
        finally:
            engine.dispose()
        depth = dict.fromkeys(queues, 0)
        depth.update({name: int(count) for name, count in rows})
        return depth
    return {}


class GroveCollector:
    """Collected on every scrape; each query is a small aggregate over indexed columns."""

    def describe(self):
        return []

    def collect(self):
        now = utcnow()
        with session_scope() as session:
            by_status = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
            queued = session.execute(
                select(Job.queue, func.count()).where(Job.status == JobStatus.queued).group_by(Job.queue)
            ).all()
            finished = session.execute(
                select(Job.kind, Job.status, Job.started_at, Job.finished_at).where(
                    Job.finished_at.is_not(None), Job.started_at.is_not(None)
                )
            ).all()
            tokens = session.execute(
                select(Job.kind, func.coalesce(func.sum(Job.trained_tokens), 0))
                .where(Job.status == JobStatus.succeeded)
                .group_by(Job.kind)
            ).all()
            workers = session.execute(select(WorkerHeartbeat)).scalars().all()
            deliveries = session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            ).all()
            queues = _known_queues(session)

        jobs = GaugeMetricFamily("grove_jobs", "Jobs by type (kind) and status.", labels=["kind", "status"])
        seen = set()
        for kind, status, count in by_status:
            jobs.add_metric([kind, str(status)], count)
            seen.add((kind, str(status)))
        for status in JobStatus:
            if (JobKind.fine_tune, str(status)) not in seen:
                jobs.add_metric([JobKind.fine_tune, str(status)], 0)
        yield jobs

        queued_jobs = GaugeMetricFamily(
            "grove_queued_jobs", "Jobs waiting for a worker, by the queue they were sent to.", labels=["queue"]
        )
        queued_counts = dict.fromkeys(queues, 0) | {q: c for q, c in queued}
        for queue, count in sorted(queued_counts.items()):
            queued_jobs.add_metric([queue], count)
        yield queued_jobs

        depth = GaugeMetricFamily("grove_queue_depth", "Messages waiting in the broker, by queue.", labels=["queue"])
        broker_up = GaugeMetricFamily("grove_broker_up", "Whether the broker answered this scrape.")
        try:
            for queue, count in sorted(broker_queue_depth(queues).items()):
                depth.add_metric([queue], count)
            broker_up.add_metric([], 1)
        except Exception as exc:
            log.warning("queue depth unavailable: %s", exc)
            broker_up.add_metric([], 0)
        yield depth
        yield broker_up

        buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(DURATION_BUCKETS) + 1))
        sums: dict[tuple[str, str], float] = defaultdict(float)
        for kind, status, started, ended in finished:
            seconds = max((ended - started).total_seconds(), 0.0)
            key = (kind, str(status))
            sums[key] += seconds
            index = next((i for i, bound in enumerate(DURATION_BUCKETS) if seconds <= bound), len(DURATION_BUCKETS))
            buckets[key][index] += 1
        duration = HistogramMetricFamily(
            "grove_job_duration_seconds",
            "Run time of finished jobs (started to finished), by kind and final status.",
            labels=["kind", "status"],
        )
        for key, counts in sorted(buckets.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
                running += count
                cumulative.append((bound, running))
            duration.add_metric(list(key), cumulative, sums[key])
        yield duration

        trained = CounterMetricFamily(
            "grove_trained_tokens", "Tokens trained on by succeeded jobs, by kind.", labels=["kind"]
        )
        for kind, total in tokens:
            trained.add_metric([kind], int(total))
        if not tokens:
            trained.add_metric([JobKind.fine_tune], 0)
        yield trained

        last_seen = GaugeMetricFamily(
            "grove_worker_last_heartbeat_timestamp_seconds",
            "When each Celery worker last wrote its heartbeat (Unix time).",
            labels=["worker", "queues"],
        )
        up = GaugeMetricFamily(
            "grove_workers_up",
            f"Workers with a heartbeat in the last {WORKER_STALE_SECONDS} s, by queue they consume.",
            labels=["queue"],
        )
        alive: dict[str, int] = dict.fromkeys(queues, 0)
        stale = now - timedelta(seconds=WORKER_STALE_SECONDS)
        for worker in workers:
            last_seen.add_metric([worker.hostname, ",".join(worker.queues or [])], worker.last_seen_at.timestamp())
            if worker.last_seen_at >= stale:
                for queue in worker.queues or []:
                    alive[queue] = alive.get(queue, 0) + 1
        for queue, count in sorted(alive.items()):
            up.add_metric([queue], count)
        yield last_seen
        yield up

        webhooks = GaugeMetricFamily(
            "grove_webhook_deliveries", "Webhook deliveries by status (pending, succeeded, failed).", labels=["status"]
        )
        counts = {"pending": 0, "succeeded": 0, "failed": 0} | {s: c for s, c in deliveries}
        for status, count in sorted(counts.items()):
            webhooks.add_metric([status], count)
        yield webhooks

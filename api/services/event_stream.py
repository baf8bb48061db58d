"""Server-Sent Events for a job's events: `GET .../events?stream=true`.

- Sends the job's events oldest first, each as `data: <event object as JSON>` + `id: <event id>`; a
  reconnect with `Last-Event-ID` (or `?after=`) resumes right after that event.
- Sends a `: heartbeat` comment when nothing else went out for `sse_heartbeat_seconds` (15 s), so
  proxies keep the connection open and a client notices a dead one.
- Closes after the terminal event (succeeded, failed, cancelled).
- Bounded per key: at most `max_streams_per_key` (8) open at once per key in one API process (one more is 429
  `too_many_streams`; with N API processes a key may hold N times that); the key is checked again every
  `sse_key_recheck_seconds` (30 s), and a stream whose key was revoked ends; and a stream ends after
  `sse_max_stream_seconds` (1 h) even if its job has not, the client reconnecting with `Last-Event-ID`.
  A stream that ends before its job says why in a comment line (`: closed: ...`).

No gaps, no duplicates: event ids come from one sequence, but a transaction can commit an event after a
later id became visible. An event is therefore held back until it is `SETTLE_SECONDS` old (transactions
that write events are short), except once the job is terminal: its terminal event is written in the
transaction that ends the job, so every event of the job is visible by then.

Frames are written by FastAPI's own SSE encoder (`fastapi.sse`). Its keep-alive only runs for a path
operation that is itself a generator; this route answers either a JSON page or a stream, so it returns
the response itself and sends its own heartbeat.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, format_sse_event
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from models.base import utcnow
from models.config import get_settings
from models.db import get_sessionmaker
from models.errors import TooManyStreams
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.project import ApiKey, Project

POLL_SECONDS = 0.5
SETTLE_SECONDS = 0.5
BATCH = 500
RECONNECT_MILLISECONDS = 2000


def _read(job_id: str, after: int | None) -> tuple[bool, list[JobEvent]]:
    """The job's terminal-ness (read first) and its events after `after`, oldest first."""
    with get_sessionmaker()() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        terminal = status is None or JobStatus(status).is_terminal
        stmt = select(JobEvent).where(JobEvent.job_id == job_id)
        if after is not None:
            stmt = stmt.where(JobEvent.id > after)
        if not terminal:
            stmt = stmt.where(JobEvent.created_at <= utcnow() - timedelta(seconds=SETTLE_SECONDS))
        events = list(session.scalars(stmt.order_by(JobEvent.id).limit(BATCH)))
        session.expunge_all()
    return terminal, events


def _key_active(key_hash: str) -> bool:
    with get_sessionmaker()() as session:
        found = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    return found is not None


class StreamSlots:
    """The event streams each key (by its sha256) holds open in this process."""

    def __init__(self):
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()  # taken in a read thread, given back on the event loop

    def take(self, key_hash: str) -> None:
        limit = get_settings().max_streams_per_key
        with self._lock:
            if self._open[key_hash] >= limit:
                raise TooManyStreams(
                    f"This key already has {limit} event streams open (GROVE_MAX_STREAMS_PER_KEY); close one, "
                    "or poll the paginated events."
                )
            self._open[key_hash] += 1

    def give_back(self, key_hash: str) -> None:
        with self._lock:
            self._open[key_hash] -= 1
            if self._open[key_hash] <= 0:
                del self._open[key_hash]

    def held(self, key_hash: str) -> int:
        return self._open[key_hash]


stream_slots = StreamSlots()


async def job_event_stream(
    job_id: str,
    after: int | None,
    render: Callable[[JobEvent], dict],
    heartbeat: float | None = None,
    key_hash: str | None = None,
) -> AsyncIterator[bytes]:
    settings = get_settings()
    heartbeat = heartbeat or settings.sse_heartbeat_seconds
    loop = asyncio.get_running_loop()
    yield format_sse_event(retry=RECONNECT_MILLISECONDS)
    last_sent = loop.time()
    ends_at = last_sent + settings.sse_max_stream_seconds
    next_key_check = last_sent + settings.sse_key_recheck_seconds
    while True:
        terminal, events = await run_in_threadpool(_read, job_id, after)
        for event in events:
            data = json.dumps(render(event), separators=(",", ":"))
            yield format_sse_event(data_str=data, id=event.public_id)
            after = event.id
            last_sent = loop.time()
        if terminal and len(events) < BATCH:
            return
        now = loop.time()
        if now >= ends_at:
            yield format_sse_event(comment="closed: stream lifetime reached; reconnect with Last-Event-ID")
            return
        if key_hash is not None and now >= next_key_check:
            if not await run_in_threadpool(_key_active, key_hash):
                yield format_sse_event(comment="closed: the API key is no longer valid")
                return
            next_key_check = now + settings.sse_key_recheck_seconds
        if len(events) == BATCH:
            continue
        if now - last_sent >= heartbeat:
            yield format_sse_event(comment="heartbeat")
            last_sent = loop.time()
        await asyncio.sleep(min(POLL_SECONDS, heartbeat, max(ends_at - now, 0)))


class _HeldStream(EventSourceResponse):
    """Gives its key's stream slot back however the stream ends: also when the client left before the first
    byte, where the generator, never started, would run no `finally`."""

    def __init__(self, content: AsyncIterator[bytes], key_hash: str, **kwargs):
        super().__init__(content, **kwargs)
        self.key_hash = key_hash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            stream_slots.give_back(self.key_hash)


def stream_response(
    job_id: str, after: int | None, render: Callable[[JobEvent], dict], key_hash: str
) -> EventSourceResponse:
    """The stream, holding one of the key's slots (429 `too_many_streams` when it has none left)."""
    stream_slots.take(key_hash)
    return _HeldStream(
        job_event_stream(job_id, after, render, key_hash=key_hash),
        key_hash,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def open_stream(
    session: Session,
    project: Project,
    key_hash: str,
    job_id: str,
    kind: JobKind,
    resume_after: str | None,
    render: Callable,
) -> EventSourceResponse:
    """Check the job is the project's (404 otherwise) and the cursor is an event id (400), then stream."""
    from api.services import job_reads

    job = job_reads.get(session, project, job_id, kind)
    return stream_response(job.id, job_reads.event_cursor(resume_after), render, key_hash)

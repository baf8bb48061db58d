"""Server-Sent Events for a job's events: `GET .../events?stream=true`.

- Sends the job's events oldest first, each as `data: <event object as JSON>` + `id: <event id>`; a
  reconnect with `Last-Event-ID` (or `?after=`) resumes right after that event.
- Sends a `: heartbeat` comment when nothing else went out for `sse_heartbeat_seconds` (15 s), so
  proxies keep the connection open and a client notices a dead one.
- Closes after the terminal event (succeeded, failed, cancelled).

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
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, format_sse_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.config import get_settings
from models.db import get_sessionmaker
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.project import Project

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


async def job_event_stream(
    job_id: str, after: int | None, render: Callable[[JobEvent], dict], heartbeat: float | None = None
) -> AsyncIterator[bytes]:
    heartbeat = heartbeat or get_settings().sse_heartbeat_seconds
    loop = asyncio.get_running_loop()
    yield format_sse_event(retry=RECONNECT_MILLISECONDS)
    last_sent = loop.time()
    while True:
        terminal, events = await run_in_threadpool(_read, job_id, after)
        for event in events:
            data = json.dumps(render(event), separators=(",", ":"))
            yield format_sse_event(data_str=data, id=event.public_id)
            after = event.id
            last_sent = loop.time()
        if len(events) == BATCH:
            continue
        if terminal:
            return
        if loop.time() - last_sent >= heartbeat:
            yield format_sse_event(comment="heartbeat")
            last_sent = loop.time()
        await asyncio.sleep(min(POLL_SECONDS, heartbeat))


def stream_response(job_id: str, after: int | None, render: Callable[[JobEvent], dict]) -> EventSourceResponse:
    return EventSourceResponse(
        job_event_stream(job_id, after, render),
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def open_stream(
    session: Session, project: Project, job_id: str, kind: JobKind, resume_after: str | None, render: Callable
) -> EventSourceResponse:
    """Check the job is the project's (404 otherwise) and the cursor is an event id (400), then stream."""
    from api.services import job_reads

    job = job_reads.get(session, project, job_id, kind)
    return stream_response(job.id, job_reads.event_cursor(resume_after), render)

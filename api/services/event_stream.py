"""Server-Sent Events for a job's events: `GET .../events?stream=true`.

- Sends the job's events oldest first, each as `id: <event id>` + `data: <event object as JSON>`; a
  reconnect with `Last-Event-ID` (or `?after=`) resumes right after that event.
- Sends a `: heartbeat` comment when nothing else went out for `sse_heartbeat_seconds` (15 s), so
  proxies keep the connection open and a client notices a dead one.
- Closes after the terminal event (succeeded, failed, cancelled).

No gaps, no duplicates: event ids come from one sequence, but a transaction can commit an event after a
later id became visible. An event is therefore held back until it is `SETTLE_SECONDS` old (transactions
that write events are short), except once the job is terminal: its terminal event is written in the
transaction that ends the job, so every event of the job is visible by then.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from models.base import utcnow
from models.config import get_settings
from models.db import get_sessionmaker
from models.job import Job, JobEvent
from models.job_status import JobStatus
from models.project import Project

POLL_SECONDS = 0.5
SETTLE_SECONDS = 0.5
BATCH = 500


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


def sse_message(event_id: str, data: dict) -> str:
    return f"id: {event_id}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def job_event_stream(
    job_id: str, after: int | None, render: Callable[[JobEvent], dict], heartbeat: float | None = None
) -> AsyncIterator[str]:
    heartbeat = heartbeat or get_settings().sse_heartbeat_seconds
    loop = asyncio.get_running_loop()
    yield "retry: 2000\n\n"
    last_sent = loop.time()
    while True:
        terminal, events = await run_in_threadpool(_read, job_id, after)
        for event in events:
            yield sse_message(event.public_id, render(event))
            after = event.id
            last_sent = loop.time()
        if len(events) == BATCH:
            continue
        if terminal:
            return
        if loop.time() - last_sent >= heartbeat:
            yield ": heartbeat\n\n"
            last_sent = loop.time()
        await asyncio.sleep(min(POLL_SECONDS, heartbeat))


def stream_response(job_id: str, after: int | None, render: Callable[[JobEvent], dict]) -> StreamingResponse:
    return StreamingResponse(
        job_event_stream(job_id, after, render),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def open_stream(
    session: Session, project: Project, job_id: str, kind: str, resume_after: str | None, render: Callable
) -> StreamingResponse:
    """Check the job is the project's (404 otherwise) and the cursor is an event id (400), then stream."""
    from api.services import jobs

    job = jobs.get(session, project, job_id, kind)
    return stream_response(job.id, jobs.event_cursor(resume_after), render)

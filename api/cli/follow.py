"""Following a job live: its Server-Sent Events stream, drawn as a progress bar (or printed as JSON lines).

The stream (`GET .../events?stream=true`) is read with httpx-sse; a dropped connection is resumed with
`Last-Event-ID`, so no event is shown twice or missed, and so is a stream the server closed before the job
ended (its lifetime is bounded). The server closes the stream after the job's terminal event; the final job
object is then read once more for its status and error. A job that pauses is not over, but there is nothing to
follow until someone resumes it: following stops at its `paused` event (if it is still paused).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import httpx
from httpx_sse import EventSource, ServerSentEvent, connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.text import Text

from api.cli.http import ApiError, Client

TERMINAL = {"succeeded", "failed", "cancelled"}
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3, "paused": 4}
RECONNECTS = 20


@dataclass
class SseEvent:
    id: str | None
    data: dict


def _job_event(frame: ServerSentEvent) -> SseEvent | None:
    """The job event a frame carries; None for a frame without data (the server's reconnect delay)."""
    return SseEvent(frame.id or None, frame.json()) if frame.data else None


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """The job events in the lines of a stream that was opened by other means (the tests, the benches)."""
    body = (f"{line}\n".encode() for line in lines)
    source = EventSource(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    return (event for frame in source.iter_sse() if (event := _job_event(frame)) is not None)


def stream_events(client: Client, job_path: str, after: str | None = None) -> Iterator[SseEvent]:
    """Every event of the job from `after` on, across reconnects, until the server ends the stream."""
    last_id, failures = after, 0
    while True:
        try:
            with connect_sse(
                client.http,
                "GET",
                f"{job_path}/events",
                params={"stream": "true"},
                headers={"last-event-id": last_id} if last_id else {},
                timeout=httpx.Timeout(10.0, read=60.0),
            ) as source:
                response = source.response
                if not response.is_success:
                    response.read()
                    client.raise_for(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    # A job kind whose events route does not stream (yet): poll its pages instead.
                    response.read()
                    yield from poll_events(client, job_path, last_id)
                    return
                for frame in source.iter_sse():
                    # Any frame, the first being the reconnect delay, shows the server is answering again.
                    failures = 0
                    if (event := _job_event(frame)) is not None:
                        last_id = event.id or last_id
                        yield event
            # The server closes a stream after the job's terminal event, and also at the stream's lifetime
            # (GROVE_SSE_MAX_STREAM_SECONDS): then it goes on after the last event received.
            if client.get(job_path).get("status") in TERMINAL:
                return
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            failures += 1
            if failures > RECONNECTS:
                raise ApiError(f"lost the event stream: {exc.__class__.__name__}: {exc}") from None
            time.sleep(min(0.5 * failures, 5.0))


def _event_number(event_id: str | None) -> int:
    number = (event_id or "").rpartition("-")[2]
    return int(number) if number.isdigit() else 0


def poll_events(client: Client, job_path: str, after: str | None, interval: float = 1.0) -> Iterator[SseEvent]:
    """The same events as the stream, by polling the (newest-first) event pages and the job's status."""
    last = _event_number(after)
    while True:
        terminal = client.get(job_path).get("status") in TERMINAL
        fresh, cursor = [], None
        while True:
            page = client.get(f"{job_path}/events", limit=100, after=cursor)
            newer = [e for e in page["data"] if _event_number(e["id"]) > last]
            fresh.extend(newer)
            if len(newer) < len(page["data"]) or not page.get("has_more"):
                break
            cursor = page["data"][-1]["id"]
        for event in sorted(fresh, key=lambda e: _event_number(e["id"])):
            last = _event_number(event["id"])
            yield SseEvent(event["id"], event)
        if terminal:
            return
        time.sleep(interval)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        total = int(task.total) if task.total else "?"
        return Text(f"step {int(task.completed)}/{total}", style="progress.download")


@dataclass
class View:
    status: str = "queued"
    step: int = 0
    total: int | None = None
    loss: str = "-"
    tokens_per_second: str = "-"
    eta: str = "-:--"
    extra: dict = field(default_factory=dict)

    def update_from_job(self, job: dict) -> None:
        # status_detail: Grove's own status where the OpenAI-shaped one is coarser (cancelling shows as running).
        self.status = job.get("status_detail") or job.get("status", self.status)
        progress = job.get("progress") or {}
        self.step = progress.get("step") or self.step
        self.total = progress.get("total_steps") or self.total
        finish = job.get("estimated_finish")
        if finish and self.status == "running":
            self.eta = duration(finish - time.time())

    def update_from_event(self, event: dict) -> None:
        data = event.get("data") or {}
        kind = event.get("event_type") or event.get("type")
        if kind in ("queued", "started", "cancelling", "pausing", "paused", *TERMINAL):
            self.status = {"started": "running"}.get(kind, kind)
        if "step" in data:
            self.step = int(data["step"])
        if data.get("total_steps"):
            self.total = int(data["total_steps"])
        if kind == "metrics":
            losses = []
            if data.get("train_loss") is not None:
                losses.append(f"{data['train_loss']:.4f}")
            if data.get("valid_loss") is not None:
                losses.append(f"val {data['valid_loss']:.4f}")
            self.loss = " ".join(losses) or self.loss
            if data.get("tokens_per_second") is not None:
                self.tokens_per_second = f"{data['tokens_per_second']:,.0f}"
            if data.get("eta_seconds") is not None:
                self.eta = duration(data["eta_seconds"])
        if self.status in TERMINAL:
            self.eta = "0:00"


def _paused_now(client: Client, job_path: str, event: dict) -> bool:
    """Whether `event` is the job's pause and the job is still paused (not a pause resumed since)."""
    return event.get("event_type") == "paused" and client.get(job_path).get("status") == "paused"


def follow(client: Client, job_path: str, *, as_json: bool, show_history: bool = True) -> dict:
    """Show the job live until it ends or pauses; return the final job object."""
    job = client.get(job_path)
    if as_json:
        for event in stream_events(client, job_path):
            sys.stdout.write(json.dumps(event.data) + "\n")
            sys.stdout.flush()
            if _paused_now(client, job_path, event.data):
                break
        return client.get(job_path)

    console = Console(stderr=False, highlight=False)
    view = View()
    view.update_from_job(job)
    columns = [
        TextColumn("[bold]{task.fields[status]:<10}"),
        BarColumn(bar_width=30),
        StepColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("tok/s {task.fields[tps]}"),
        TextColumn("ETA {task.fields[eta]}"),
    ]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as bar:
        task = bar.add_task(job["id"], total=view.total, completed=view.step, **_fields(view))
        for event in stream_events(client, job_path):
            data = event.data
            view.update_from_event(data)
            if data.get("event_type") != "metrics" and show_history:
                stamp = time.strftime("%H:%M:%S", time.localtime(data.get("created_at") or time.time()))
                style = {"error": "red", "warn": "yellow"}.get(data.get("level", ""), "")
                bar.console.print(f"[dim]{stamp}[/dim] [{style or 'default'}]{data.get('message', '')}[/]")
            bar.update(task, total=view.total, completed=view.step, **_fields(view))
            if _paused_now(client, job_path, data):
                break
        job = client.get(job_path)
        view.update_from_job(job)
        bar.update(task, total=view.total, completed=view.step, **_fields(view))
    return job


def _fields(view: View) -> dict:
    return {"status": view.status, "loss": view.loss, "tps": view.tokens_per_second, "eta": view.eta}

"""Live events: Server-Sent Events from a real server, read with a real HTTP client (httpx).

The live stack sends a heartbeat every second (GROVE_SSE_HEARTBEAT_SECONDS=1) instead of 15.
"""

from __future__ import annotations

import json
import time

import httpx

from api.cli.follow import parse_sse
from tests.conftest import use_database
from tests.e2e.helpers import sdk, upload_emotion, wait_for

TERMINAL_EVENTS = {"succeeded", "failed", "cancelled"}


def _start_job(client, tmp_path, max_steps: int = 8) -> str:
    training = upload_emotion(client, tmp_path, 16)
    return client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        extra_body={"text_template": "{text} -> {label}", "max_steps": max_steps, "log_every_steps": 1},
    ).id


def _read(response: httpx.Response, limit: int | None = None) -> tuple[list[dict], list[str], bool]:
    """Events (and their SSE ids) until `limit` events, or until the server closes the stream (True)."""
    events, ids = [], []
    for item in parse_sse(response.iter_lines()):
        if item is None:
            continue
        events.append(item.data)
        ids.append(item.id)
        if limit is not None and len(events) >= limit:
            return events, ids, False
    return events, ids, True


def test_stream_resumes_with_last_event_id_without_gaps_or_duplicates(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    job_id = _start_job(client, tmp_path)
    url = f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/events"
    headers = {"Authorization": f"Bearer {key}"}

    with httpx.stream("GET", url, params={"stream": "true"}, headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first, first_ids, closed = _read(response, limit=4)
    assert not closed and [e["event_type"] for e in first[:2]] == ["created", "queued"]
    assert first_ids == [e["id"] for e in first]

    # Reconnect as EventSource does: the Last-Event-ID header names the last event received.
    with httpx.stream(
        "GET", url, params={"stream": "true"}, headers=headers | {"Last-Event-ID": first_ids[-1]}, timeout=120
    ) as response:
        rest, _, closed = _read(response)
    assert closed, "the server closes the stream after the terminal event"
    assert rest and rest[-1]["event_type"] in TERMINAL_EVENTS

    streamed = [e["id"] for e in first + rest]
    job = wait_for(client, job_id)
    assert job.status == "succeeded", live.log("worker.log")
    listed = [e.id for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)][::-1]
    assert streamed == listed, "the two connections together give every event once, in order"
    assert len(set(streamed)) == len(streamed)
    metrics = [e for e in first + rest if e["event_type"] == "metrics"]
    assert [m["data"]["step"] for m in metrics] == list(range(1, 9))

    # A finished job's stream replays its events and closes at once.
    started = time.monotonic()
    with httpx.stream("GET", url, params={"stream": "true"}, headers=headers, timeout=30) as response:
        replay, _, closed = _read(response)
    assert closed and [e["id"] for e in replay] == listed and time.monotonic() - started < 10


def test_heartbeat_while_idle_and_close_on_cancel(live, client, tmp_path):
    key = live.new_key()
    auth = {"Authorization": f"Bearer {key}"}
    # Created through the in-process API on the live stack's database: it is queued on the in-process queue,
    # which no worker consumes, so it stays idle.
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(12)))
    with use_database(live.database_url), path.open("rb") as f:
        file_id = client.post("/v1/files", headers=auth, files={"file": f}, data={"purpose": "fine-tune"}).json()["id"]
        job_id = client.post(
            "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": file_id}
        ).json()["id"]

    url = f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/events"
    lines = []
    with httpx.stream("GET", url, params={"stream": "true"}, headers=auth, timeout=30) as response:
        iterator = response.iter_lines()
        deadline = time.monotonic() + 10
        while ": heartbeat" not in lines and time.monotonic() < deadline:
            lines.append(next(iterator))
        assert ": heartbeat" in lines, lines
        assert httpx.post(f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).status_code == 200
        tail = list(iterator)  # ends: the server closes after the terminal event
    events = [json.loads(line[len("data: ") :]) for line in lines + tail if line.startswith("data: ")]
    assert [e["event_type"] for e in events] == ["created", "queued", "cancelled"]


def test_stream_errors_use_the_envelope(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    job_id = _start_job(client, tmp_path, max_steps=1)
    url = f"{live.base_url}/v1/fine_tuning/jobs/{job_id}/events"
    bad = httpx.get(url, params={"stream": "true"}, headers={"Authorization": f"Bearer {key}", "Last-Event-ID": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"
    other = httpx.get(url, params={"stream": "true"}, headers={"Authorization": f"Bearer {live.new_key()}"})
    assert other.status_code == 404
    wait_for(client, job_id)

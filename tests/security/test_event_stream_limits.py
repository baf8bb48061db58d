"""Issue 16, event streams (`GET /v1/fine_tuning/jobs/{id}/events?stream=true`): bounded per key, and none
outlives its key or its lifetime.

Before, a key could open any number of streams, each held for as long as its job ran, and a revoked key went
on streaming. Now one key holds at most GROVE_MAX_STREAMS_PER_KEY streams in an API process (one more is 429
`too_many_streams`); an open stream checks its key every GROVE_SSE_KEY_RECHECK_SECONDS and ends once it is
revoked; and every stream ends after GROVE_SSE_MAX_STREAM_SECONDS, the client reconnecting with Last-Event-ID
without a gap (api/services/event_stream.py).

The jobs here stay queued (no worker consumes the in-process queue), so their streams would never end by
themselves: each read below has a deadline.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from api.services.event_stream import stream_slots
from models.config import get_settings
from models.project import hash_key
from tests.security.conftest import assert_refused


def _key(tenant) -> tuple[str, str]:
    """A key of its own (its id and the key) for the tenant's project, so that no other test's streams count."""
    from api.services.keys import issue
    from models.db import session_scope
    from models.project import Project

    with session_scope() as session:
        row, key = issue(session, session.get(Project, tenant.project_id))
        return row.id, key


def _revoke(key_id: str) -> None:
    from api.services.keys import revoke
    from models.db import session_scope

    with session_scope() as session:
        revoke(session, key_id)


@pytest.fixture
def events_url(tenant) -> str:
    response = tenant.post("/v1/fine_tuning/jobs", tenant.base())
    assert response.status_code == 200, response.text
    return f"/v1/fine_tuning/jobs/{response.json()['id']}/events"


@pytest.fixture
def quick(monkeypatch):
    """Heartbeats every 0.2 s, so that a read of an idle stream comes back often enough to check its deadline."""
    settings = get_settings()
    monkeypatch.setattr(settings, "sse_heartbeat_seconds", 0.2)
    return settings


def _read(lines, deadline: float, stop_after_events: int | None = None) -> tuple[list[str], list[str], bool]:
    """Event ids and comment lines until the stream ends (True) or `stop_after_events` events were read."""
    ids, comments = [], []
    for line in lines:
        if line.startswith("id:"):
            ids.append(line[3:].strip())
        elif line.startswith(":"):
            comments.append(line[1:].strip())
        if stop_after_events is not None and len(ids) >= stop_after_events:
            return ids, comments, False
        assert time.monotonic() < deadline, f"the stream is still open: {ids}, {comments[-3:]}"
    return ids, comments, True


def _stream(tenant, url: str, key: str, last_event_id: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} | ({"Last-Event-ID": last_event_id} if last_event_id else {})
    return tenant.client.stream("GET", url, params={"stream": "true"}, headers=headers)


def test_one_stream_more_than_the_cap_is_429(tenant, events_url, quick, monkeypatch):
    monkeypatch.setattr(quick, "max_streams_per_key", 3)
    _, key = _key(tenant)
    _, other = _key(tenant)
    with contextlib.ExitStack() as streams:
        opened = [streams.enter_context(_stream(tenant, events_url, key)) for _ in range(3)]
        assert [r.status_code for r in opened] == [200, 200, 200]
        refused = tenant.client.get(events_url, params={"stream": "true"}, headers={"Authorization": f"Bearer {key}"})
        error = assert_refused(refused, 429, None)
        assert error["code"] == "too_many_streams" and "GROVE_MAX_STREAMS_PER_KEY" in error["message"]
        assert stream_slots.held(hash_key(key)) == 3
        with _stream(tenant, events_url, other) as theirs:  # another key has its own streams
            assert theirs.status_code == 200
        # The paginated events stay open to the key.
        assert tenant.client.get(events_url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # Closed streams give their places back.
    assert stream_slots.held(hash_key(key)) == 0
    with _stream(tenant, events_url, key) as again:
        assert again.status_code == 200


@pytest.mark.parametrize(
    ("cause", "setting", "seconds", "comment"),
    [
        ("the key is revoked", "sse_key_recheck_seconds", 0.5, "closed: the API key is no longer valid"),
        ("its lifetime ends", "sse_max_stream_seconds", 1.5, "closed: stream lifetime reached"),
    ],
)
def test_a_stream_ends_when(tenant, events_url, quick, monkeypatch, cause, setting, seconds, comment):
    monkeypatch.setattr(quick, setting, seconds)
    key_id, key = _key(tenant)
    with _stream(tenant, events_url, key) as response:
        assert response.status_code == 200
        opened, lines = time.monotonic(), response.iter_lines()
        _read(lines, opened + 10, stop_after_events=2)  # created, queued
        if cause == "the key is revoked":
            _revoke(key_id)
        ended_from = time.monotonic()
        _, comments, ended = _read(lines, ended_from + 10)
    took = time.monotonic() - (ended_from if cause == "the key is revoked" else opened)
    assert ended and comments[-1].startswith(comment), comments[-3:]
    # Within the interval, plus one poll of the stream (0.5 s) and slack for a loaded machine.
    assert took < seconds + 2.5, took
    assert stream_slots.held(hash_key(key)) == 0
    if cause == "the key is revoked":
        assert_refused(_get(tenant, events_url, key), 401, None)  # and it cannot open another


def _get(tenant, url: str, key: str):
    return tenant.client.get(url, params={"stream": "true"}, headers={"Authorization": f"Bearer {key}"})


def test_a_reconnect_after_the_lifetime_resumes_without_a_gap(tenant, events_url, quick, monkeypatch):
    monkeypatch.setattr(quick, "sse_max_stream_seconds", 1.0)
    _, key = _key(tenant)
    with _stream(tenant, events_url, key) as response:
        first, comments, ended = _read(response.iter_lines(), time.monotonic() + 10)
    assert ended and comments[-1].startswith("closed: stream lifetime reached") and len(first) >= 2

    # Events written while no stream is open: the job is cancelled.
    job_url = events_url.removesuffix("/events")
    assert tenant.client.post(f"{job_url}/cancel", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with _stream(tenant, events_url, key, last_event_id=first[-1]) as response:
        rest, _, ended = _read(response.iter_lines(), time.monotonic() + 10)
    assert ended and rest, "the job's terminal event closes the resumed stream"

    listed = tenant.client.get(events_url, params={"limit": 100}, headers={"Authorization": f"Bearer {key}"})
    every = [event["id"] for event in listed.json()["data"]][::-1]
    assert first + rest == every, "the two connections give every event once, in order"

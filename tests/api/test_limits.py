"""Request limits: JSON body size (413), the per-key rate limit (429 with Retry-After, counted in Redis), and
the number of unfinished jobs a project may hold (429 too_many_jobs, for every kind of job)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import redis

from api.limits import limiter_storage_url
from models.config import get_settings
from tests.api.test_files import jsonl, upload
from tests.conftest import REDIS_URL, emotion_rows, new_key

TEMPLATE = "{text} -> {label}"


def test_a_json_body_over_the_limit_is_413_naming_the_limit(client, auth):
    limit = get_settings().max_json_body_bytes
    big = {"model": "tiny-llama-test", "training_file": "file-x", "metadata": {"pad": "x" * limit}}
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=big)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(limit) in error["message"]
    assert "GROVE_MAX_JSON_BODY_BYTES" in error["message"]
    # Just under the limit it reaches the route (which refuses the unknown file: 400, not 413).
    small = {"model": "tiny-llama-test", "training_file": "file-x", "metadata": {"pad": "x" * 1000}}
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=small).status_code == 400


def test_a_chunked_json_body_is_cut_at_the_limit(client, auth, monkeypatch):
    monkeypatch.setattr(get_settings(), "max_json_body_bytes", 2000)

    def chunks():  # no Content-Length: the server counts what it reads and stops past 2,000 bytes
        for _ in range(100):
            yield b" " * 1000

    response = client.post(
        "/v1/webhook_endpoints", headers=auth | {"content-type": "application/json"}, content=chunks()
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert response.json()["error"]["message"].startswith("Request body exceeds the limit of 2000 bytes")

    # A chunked body under the limit is passed on whole.
    def small():
        body = json.dumps({"name": "x", "url": "http://127.0.0.1:9/h", "event_types": ["fine_tuning.job.failed"]})
        yield body[:10].encode()
        yield body[10:].encode()

    response = client.post(
        "/v1/webhook_endpoints", headers=auth | {"content-type": "application/json"}, content=small()
    )
    assert response.status_code == 200, response.text


def test_uploads_are_not_held_to_the_json_limit(client, auth, monkeypatch):
    monkeypatch.setattr(get_settings(), "max_json_body_bytes", 1000)
    content = jsonl(emotion_rows(40))
    assert len(content) > 1000
    assert upload(client, auth, content).status_code == 200


def test_the_rate_limit_answers_429_with_retry_after_per_key(client, monkeypatch):
    monkeypatch.setattr(get_settings(), "rate_limit", "3/minute")
    key, other = new_key(), new_key()
    headers = {"Authorization": f"Bearer {key}"}
    assert [client.get("/v1/models", headers=headers).status_code for _ in range(3)] == [200, 200, 200]
    response = client.get("/v1/files", headers=headers)
    assert response.status_code == 429, response.text
    assert (
        response.json()["error"]["code"] == "rate_limit_exceeded" and "3/minute" in response.json()["error"]["message"]
    )
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    # Another key has its own budget; requests without a key are not counted.
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 200
    assert client.get("/healthz").status_code == 200

    # The counters are in the broker's Redis, under the key's sha256, never the key itself.
    assert limiter_storage_url(get_settings()) == "async+" + REDIS_URL
    store = redis.Redis.from_url(REDIS_URL)
    names = [n.decode() for n in store.scan_iter(match="grove-rate*")]
    assert any(hashlib.sha256(key.encode()).hexdigest() in n for n in names)
    assert not any(key in n for n in names)


def test_fixed_window_and_memory_storage(client, monkeypatch):
    settings = get_settings()
    monkeypatch.setattr(settings, "rate_limit", "2 per 2 seconds")
    monkeypatch.setattr(settings, "rate_limit_strategy", "fixed-window")
    monkeypatch.setattr(settings, "rate_limit_storage_url", "memory://")
    headers = {"Authorization": f"Bearer {new_key()}"}
    codes = [client.get("/v1/models", headers=headers).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert 1 <= int(client.get("/v1/models", headers=headers).headers["retry-after"]) <= 2
    time.sleep(2.1)
    assert client.get("/v1/models", headers=headers).status_code == 200


def test_storage_follows_the_broker():
    from models.config import Settings

    assert limiter_storage_url(Settings(broker_url="redis://h:6379/2")) == "async+redis://h:6379/2"
    assert limiter_storage_url(Settings(broker_url="sqla+sqlite:///var/broker.sqlite")) == "async+memory://"
    assert limiter_storage_url(Settings(rate_limit_storage_url="redis://r/1")) == "async+redis://r/1"


def test_the_rate_limit_is_on_by_default():  # issue 16: it was off (tests/security/test_rate_limits.py)
    assert get_settings().rate_limit == "1200/minute"


@pytest.fixture
def full_project(client, monkeypatch):
    """A project at a limit of 2 unfinished jobs, holding 2 queued fine-tuning jobs."""
    monkeypatch.setattr(get_settings(), "max_queued_jobs_per_project", 2)
    headers = {"Authorization": f"Bearer {new_key()}"}
    train = upload(client, headers, jsonl(emotion_rows(24))).json()["id"]
    valid = upload(client, headers, jsonl(emotion_rows(10, offset=24))).json()["id"]
    job = {"model": "tiny-llama-test", "training_file": train, "text_template": TEMPLATE}
    ids = [client.post("/v1/fine_tuning/jobs", headers=headers, json=job).json()["id"] for _ in range(2)]
    return headers, job, valid, ids


def test_every_kind_of_job_is_429_when_the_project_is_full(client, full_project):
    headers, job, valid, ids = full_project
    creates = {
        "/v1/fine_tuning/jobs": job,
        "/v1/exports": {"source": {"model": "tiny-llama-test"}},
        "/v1/evaluations": {"evaluation_file": valid, "targets": ["tiny-llama-test"], "text_template": TEMPLATE},
        "/v1/sweeps": {
            "fine_tuning": job | {"validation_file": valid, "max_steps": 2},
            "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
            "num_trials": 2,
        },
    }
    for path, body in creates.items():
        response = client.post(path, headers=headers, json=body)
        assert response.status_code == 429, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "too_many_jobs" and "limit 2" in error["message"], (path, error)
    # A finished (cancelled) job frees its place.
    client.post(f"/v1/fine_tuning/jobs/{ids[0]}/cancel", headers=headers)
    response = client.post("/v1/exports", headers=headers, json=creates["/v1/exports"])
    assert response.status_code == 200, response.text

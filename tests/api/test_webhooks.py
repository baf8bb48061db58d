"""Webhook endpoints (OpenAI's /v1/webhook_endpoints), the outbox written by a job's terminal transition,
signing verified with the OpenAI SDK, retries with backoff, and the destination policy (no SSRF).

The sender is exercised by calling it (worker.webhooks.send_due / deliver), against a real HTTP receiver on
loopback; tests/e2e/test_operations.py runs the same through a live stack.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from openai import OpenAI
from sqlalchemy import select, update

from models.base import utcnow
from models.db import session_scope
from models.webhook import WebhookDelivery
from tests.conftest import emotion_rows, new_key, write_jsonl


class Receiver:
    """An HTTP server on 127.0.0.1 that answers each POST with the next status of `statuses` (then 200)."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/grove?source=test"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"received {len(self.requests)} of {count} deliveries"


@contextmanager
def receiver(statuses: list[int] | None = None) -> Iterator[Receiver]:
    r = Receiver(statuses)
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def _queued_job(client, auth, tmp_path) -> str:
    path = write_jsonl(tmp_path / "train.jsonl", emotion_rows(12))
    with path.open("rb") as f:
        file_id = client.post("/v1/files", headers=auth, files={"file": f}, data={"purpose": "fine-tune"}).json()["id"]
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json={"model": "tiny-llama-test", "training_file": file_id, "text_template": "{text} -> {label}"},
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _deliveries(client, auth, endpoint_id: str) -> list[dict]:
    response = client.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def _make_due(delivery_id: str) -> None:
    """Skip the backoff wait: the retry schedule itself is asserted separately."""
    with session_scope() as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(next_attempt_at=utcnow())
        )


def test_endpoint_crud_in_openai_shape(client, auth):
    with receiver() as r:
        created = client.post(
            "/v1/webhook_endpoints",
            headers=auth,
            json={"name": "ci", "url": r.url, "event_types": ["fine_tuning.job.succeeded", "fine_tuning.job.failed"]},
        )
        assert created.status_code == 200, created.text
        endpoint = created.json()
        assert endpoint["object"] == "webhook_endpoint" and endpoint["signing_secret"].startswith("whsec_")
        assert endpoint["signing_secret_hint"].endswith(endpoint["signing_secret"][-4:])

        got = client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth).json()
        assert "signing_secret" not in got and got["url"] == r.url
        listed = client.get("/v1/webhook_endpoints", headers=auth).json()
        assert [e["id"] for e in listed["data"]] == [endpoint["id"]]

        updated = client.post(
            f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth, json={"event_types": ["export.job.succeeded"]}
        ).json()
        assert updated["event_types"] == ["export.job.succeeded"]

        rotated = client.post(f"/v1/webhook_endpoints/{endpoint['id']}/rotate_secret", headers=auth, json={}).json()
        assert rotated["signing_secret"] != endpoint["signing_secret"]

        tested = client.post(
            f"/v1/webhook_endpoints/{endpoint['id']}/test", headers=auth, json={"event_type": "fine_tuning.job.failed"}
        ).json()
        assert tested == {
            "event_type": "fine_tuning.job.failed",
            "object": "webhook_endpoint.test",
            "status_code": 200,
            "success": True,
            "webhook_endpoint_id": endpoint["id"],
        }
        assert json.loads(r.requests[-1][1])["type"] == "fine_tuning.job.failed"

        types = client.get("/v1/webhook_event_types", headers=auth).json()["data"]
        assert {"fine_tuning.job.succeeded", "export.job.failed", "evaluation.job.cancelled"} <= set(types)

        deleted = client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth).json()
        assert deleted == {"id": endpoint["id"], "object": "webhook_endpoint.deleted", "deleted": True}
        assert client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=auth).status_code == 404


def test_other_projects_see_nothing(client, auth):
    with receiver() as r:
        endpoint = client.post(
            "/v1/webhook_endpoints",
            headers=auth,
            json={"name": "a", "url": r.url, "event_types": ["fine_tuning.job.succeeded"]},
        ).json()
    other = {"Authorization": f"Bearer {new_key()}"}
    assert client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=other).status_code == 404
    assert client.delete(f"/v1/webhook_endpoints/{endpoint['id']}", headers=other).status_code == 404
    assert client.get("/v1/webhook_endpoints", headers=other).json()["data"] == []


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://169.254.169.254/latest/meta-data/", "http is only allowed"),
        ("https://169.254.169.254/latest/meta-data/", "non-public address"),
        ("https://10.1.2.3/hook", "non-public address"),
        ("https://192.168.0.10:8443/hook", "non-public address"),
        ("https://[::1]/hook", "non-public address"),
        ("https://[::ffff:127.0.0.1]/hook", "non-public address"),
        ("https://0xa9fea9fe/hook", "non-public address"),  # 169.254.169.254 written as one hex number
        ("https://127.0.0.2/hook", "non-public address"),  # loopback, but not the allowlisted address
        ("ftp://example.com/hook", "must use https"),
        ("https://user:pw@127.0.0.1/hook", "credentials"),
        ("https:///nohost", "no host"),
    ],
)
def test_destinations_outside_the_policy_are_refused(client, auth, url, fragment):
    response = client.post(
        "/v1/webhook_endpoints", headers=auth, json={"name": "x", "url": url, "event_types": ["fine_tuning.job.failed"]}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "url" and fragment in error["message"], error


def test_unknown_event_type_is_named(client, auth):
    response = client.post(
        "/v1/webhook_endpoints",
        headers=auth,
        json={"name": "x", "url": "http://127.0.0.1:9/", "event_types": ["batch.completed"]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "event_types"
    assert "batch.completed" in response.json()["error"]["message"]


def test_cancelled_job_is_delivered_signed_and_retried_with_backoff(client, auth, key, tmp_path):
    from models.config import get_settings
    from worker.webhooks import backoff_seconds, send_due

    with receiver(statuses=[503]) as r:
        endpoint = client.post(
            "/v1/webhook_endpoints",
            headers=auth,
            json={"name": "ops", "url": r.url, "event_types": ["fine_tuning.job.cancelled"]},
        ).json()
        job_id = _queued_job(client, auth, tmp_path)
        # No delivery yet: the job has not ended.
        assert _deliveries(client, auth, endpoint["id"]) == []
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"

        [pending] = _deliveries(client, auth, endpoint["id"])
        assert pending["status"] == "pending" and pending["attempts"] == 0
        assert pending["event"]["type"] == "fine_tuning.job.cancelled" and pending["event"]["data"] == {"id": job_id}

        before = time.time()
        send_due()
        [first] = _deliveries(client, auth, endpoint["id"])
        assert first["status"] == "pending" and first["attempts"] == 1 and first["response_status_code"] == 503
        delay = first["next_attempt_at"] - before
        assert backoff_seconds(1) - 1 <= delay <= backoff_seconds(1) + 2, delay
        assert backoff_seconds(2) == 2 * backoff_seconds(1)
        assert backoff_seconds(50) == get_settings().webhook_retry_max_seconds

        send_due()  # not due yet: nothing is sent
        assert len(r.requests) == 1
        _make_due(first["id"])
        send_due()
        [done] = _deliveries(client, auth, endpoint["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 2 and done["delivered_at"]

    # Both attempts carried the same event and id, each signed so that the OpenAI SDK accepts it.
    sdk = OpenAI(api_key=key, base_url="http://127.0.0.1:9/v1")
    ids = set()
    for headers, body in r.requests:
        event = sdk.webhooks.unwrap(body, headers, secret=endpoint["signing_secret"])
        assert event.type == "fine_tuning.job.cancelled" and event.data.id == job_id
        ids.add(headers["webhook-id"])
        assert headers["host"] == r.url.split("/")[2]
    assert ids == {done["event_id"]}
    with pytest.raises(Exception, match="signature"):
        sdk.webhooks.verify_signature(r.requests[0][1], r.requests[0][0], secret="whsec_" + "A" * 44)


def test_delivery_gives_up_after_max_attempts(client, auth, tmp_path, monkeypatch):
    from models.config import get_settings
    from worker.webhooks import deliver

    monkeypatch.setattr(get_settings(), "webhook_max_attempts", 2)
    with receiver(statuses=[500, 500, 500]) as r:
        endpoint = client.post(
            "/v1/webhook_endpoints",
            headers=auth,
            json={"name": "flaky", "url": r.url, "event_types": ["fine_tuning.job.cancelled"]},
        ).json()
        job_id = _queued_job(client, auth, tmp_path)
        client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
        [pending] = _deliveries(client, auth, endpoint["id"])
        assert deliver(pending["id"]) == "pending"
        assert deliver(pending["id"]) is None  # backing off: not due, so not claimed
        _make_due(pending["id"])
        assert deliver(pending["id"]) == "failed"
        [failed] = _deliveries(client, auth, endpoint["id"])
        assert failed["status"] == "failed" and failed["attempts"] == 2 and "HTTP 500" in failed["error"]
        assert failed["next_attempt_at"] is None
        assert len(r.requests) == 2


def test_two_senders_never_send_one_delivery_twice(client, auth, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from worker.webhooks import deliver

    with receiver() as r:
        endpoint = client.post(
            "/v1/webhook_endpoints",
            headers=auth,
            json={"name": "race", "url": r.url, "event_types": ["fine_tuning.job.cancelled"]},
        ).json()
        job_id = _queued_job(client, auth, tmp_path)
        client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
        [pending] = _deliveries(client, auth, endpoint["id"])
        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(deliver, [pending["id"]] * 4))
        # One of the four claims it and sends it; the others find it claimed and send nothing. (No other sender
        # runs on this database: the live stacks' senders have databases of their own.)
        assert outcomes.count("succeeded") == 1 and outcomes.count(None) == 3, outcomes
        r.wait_for(1, timeout=10)
        time.sleep(1)  # room for a second, wrong sending to arrive
        assert len(r.requests) == 1


def test_no_endpoint_no_outbox_rows(client, auth, tmp_path):
    job_id = _queued_job(client, auth, tmp_path)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    from models.webhook import WebhookEvent

    with session_scope() as session:
        assert session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)).all() == []

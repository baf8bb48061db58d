"""Operations against a live stack: webhooks end to end, /metrics, and structured logs."""

from __future__ import annotations

import json
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.test_webhooks import receiver
from tests.e2e.helpers import sdk, upload_emotion, wait_for


def _run_job(client, tmp_path, max_steps: int = 3) -> str:
    training = upload_emotion(client, tmp_path, 16)
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        extra_body={"text_template": "{text} -> {label}", "max_steps": max_steps},
    )
    return job.id


def test_webhook_receiver_that_fails_twice_then_accepts(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    with receiver(statuses=[500, 502]) as r:
        endpoint = client.webhooks.create(
            name="ci", url=r.url, event_types=["fine_tuning.job.succeeded", "fine_tuning.job.failed"]
        )
        assert endpoint.signing_secret.startswith("whsec_")
        job_id = _run_job(client, tmp_path)
        assert wait_for(client, job_id).status == "succeeded", live.log("worker.log")
        r.wait_for(3, timeout=60)
        time.sleep(0.5)
        assert len(r.requests) == 3, "delivered once it was accepted, never again"

    timestamps = []
    for headers, body in r.requests:
        event = client.webhooks.unwrap(body, headers, secret=endpoint.signing_secret)
        assert event.type == "fine_tuning.job.succeeded" and event.data.id == job_id and event.object == "event"
        timestamps.append(int(headers["webhook-timestamp"]))
    assert len({h["webhook-id"] for h, _ in r.requests}) == 1, "every retry carries the same event id"
    assert timestamps == sorted(timestamps)

    page = httpx.get(
        f"{live.base_url}/v1/webhook_endpoints/{endpoint.id}/deliveries", headers={"Authorization": f"Bearer {key}"}
    ).json()
    [delivery] = page["data"]
    assert delivery["status"] == "succeeded" and delivery["attempts"] == 3
    assert delivery["response_status_code"] == 200 and delivery["event"]["data"] == {"id": job_id}
    assert [e.id for e in client.webhooks.list()] == [endpoint.id]


def _metrics(base_url: str) -> dict[str, list]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_and_json_logs(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    job_id = _run_job(client, tmp_path, max_steps=2)
    assert wait_for(client, job_id).status == "succeeded"
    request_id = f"req-{job_id[-8:]}"
    got = httpx.get(
        f"{live.base_url}/v1/fine_tuning/jobs/{job_id}",
        headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
    )
    assert got.headers["x-request-id"] == request_id

    families = _metrics(live.base_url)
    latency = families["grove_http_request_duration_seconds"]
    assert any(
        s.labels.get("route") == "/v1/fine_tuning/jobs/{job_id}" and s.name.endswith("_count") and s.value >= 1
        for s in latency
    )
    jobs = {(s.labels["kind"], s.labels["status"]): s.value for s in families["grove_jobs"]}
    assert jobs[("fine_tune", "succeeded")] >= 1
    live_queue = live.env["GROVE_FINE_TUNE_QUEUE"]
    depth = {s.labels["queue"]: s.value for s in families["grove_queue_depth"]}
    assert live_queue in depth and depth[live_queue] >= 0
    assert {s.labels["queue"]: s.value for s in families["grove_workers_up"]}[live_queue] >= 1
    assert any(s.value > time.time() - 60 for s in families["grove_worker_last_heartbeat_timestamp_seconds"])
    durations = [s for s in families["grove_job_duration_seconds"] if s.name.endswith("_count")]
    assert any(s.labels == {"kind": "fine_tune", "status": "succeeded"} and s.value >= 1 for s in durations)
    assert any(s.value > 0 for s in families["grove_trained_tokens"])
    assert families["grove_broker_up"][0].value == 1

    # Every API line is one JSON object; the request's line carries its id and the job's id.
    api_lines = [
        json.loads(line)
        for line in (live.logs / "api.log").read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    assert any(
        line.get("request_id") == request_id and line.get("job_id") == job_id and line.get("status") == 200
        for line in api_lines
    ), api_lines[-5:]
    # The worker's lines about the job (Celery's own "Task ... succeeded" included) carry the job id.
    worker_lines = [
        json.loads(line)
        for line in (live.logs / "worker.log").read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    mine = [line for line in worker_lines if line.get("job_id") == job_id]
    assert any("succeeded" in line["message"] for line in mine), worker_lines[-5:]

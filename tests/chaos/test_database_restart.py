"""The database goes away and comes back: 503 (never 500) meanwhile, service within seconds after,
and the training job still finishes: its worker, which reads the job's status at every step, waits for the
database and gives the job back, and the job resumes and succeeds."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.chaos.test_faults import SPEC, TERMINAL, client_for, dataset, upload, wait_all
from tests.conftest import Stack, alembic
from tests.servers import PostgresServer


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of the test's own, so that stopping it hurts nobody else."""
    server = PostgresServer(prefix="grove-chaos-pg-", max_connections=100).init().start()
    yield server
    server.destroy()


def messages(http: httpx.Client, job_id: str) -> list[str]:
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    return [e["message"] for e in reversed(events)]


def test_database_restart(private_postgres, private_redis, tiny_model):
    alembic("upgrade", "head", url=private_postgres.url)
    stack = Stack(
        f"pgrestart-{uuid.uuid4().hex[:6]}",
        {
            "GROVE_DATABASE_URL": private_postgres.url,
            "GROVE_BROKER_URL": private_redis.url,
            "GROVE_FINE_TUNE_QUEUE": "pgrestart",
            "GROVE_RUN_RECONCILER": "true",  # as in production: the API's reconciler republishes requeued jobs
            "GROVE_RECONCILE_INTERVAL_SECONDS": "1",
            "GROVE_LEASE_SECONDS": "30",
        },
    )
    try:
        key = stack.grove("keys", "create", "--project", "restart")
        stack.start()
        with client_for(stack, key) as http:
            file_id = upload(http, dataset(40)).json()["id"]
            job_id = http.post("/v1/fine_tuning/jobs", json=SPEC | {"training_file": file_id, "max_steps": 200}).json()[
                "id"
            ]
            # Training has begun: total_steps is written as the loop starts, past loading the libraries and the
            # model; from then on the worker reads the job at every step, so the outage is sure to reach it.
            deadline = time.monotonic() + 120
            while True:
                job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if job["progress"]["total_steps"] is not None or job["status"] in TERMINAL:
                    break
                assert time.monotonic() < deadline, (job, messages(http, job_id), stack.log("worker.log"))
                time.sleep(0.2)
            assert job["status"] == "running", (job, messages(http, job_id), stack.log("worker.log"))

            private_postgres.stop()
            down = [http.get(f"/v1/fine_tuning/jobs/{job_id}") for _ in range(3)]
            assert {r.status_code for r in down} == {503}, [r.text for r in down]
            assert all(r.json()["error"]["code"] == "service_unavailable" for r in down)
            assert httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 503
            time.sleep(3)

            private_postgres.start()
            back = time.monotonic()
            while http.get(f"/v1/fine_tuning/jobs/{job_id}").status_code != 200:
                assert time.monotonic() - back < 10, "the API did not recover within 10 s"
                time.sleep(0.1)
            recovered_in = time.monotonic() - back
            try:
                job = wait_all(http, [job_id], timeout=240)[job_id]
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nevents: {messages(http, job_id)}\n{stack.log('worker.log')}") from exc
            assert job["status"] == "succeeded", (job["error"], stack.log("worker.log"))
            history = messages(http, job_id)
            assert any("lost its database connection" in m for m in history), history
            assert sum(m.startswith("Fine-tuning job started") for m in history) == 2, history
            print(f"database restart: API answering again {recovered_in:.2f} s after the database returned")
    finally:
        stack.stop()

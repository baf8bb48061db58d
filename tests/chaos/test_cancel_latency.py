"""Cancel under load: a running job stops within two optimizer steps of the request, every time, and a queued
job is cancelled at once and never starts. `make chaos` repeats it 20 times; CI, 3 times."""

from __future__ import annotations

import time

from tests.chaos.conftest import scale
from tests.chaos.test_faults import SPEC, client_for, dataset, event_types, upload, wait_all

# One metrics event per step, so that the events count the steps taken after the cancel was written.
LONG = SPEC | {"max_steps": 20000, "log_every_steps": 1}


def wait_until_step(http, job_id: str, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not reach step {step}")


def test_cancel_stops_a_running_job_within_two_steps_and_a_queued_job_at_once(live):
    with client_for(live, live.new_key()) as http:
        file_id = upload(http, dataset(20)).json()["id"]
        steps_after_cancel, seconds_to_cancelled = [], []
        for _ in range(scale(3, 20)):
            running = http.post("/v1/fine_tuning/jobs", json=LONG | {"training_file": file_id}).json()["id"]
            queued = http.post("/v1/fine_tuning/jobs", json=LONG | {"training_file": file_id}).json()["id"]
            wait_until_step(http, running, 5)

            # The worker runs one job at a time: the second one is still queued, and is cancelled outright.
            cancelled = http.post(f"/v1/fine_tuning/jobs/{queued}/cancel").json()
            assert cancelled["status"] == "cancelled"

            requested = time.monotonic()
            assert http.post(f"/v1/fine_tuning/jobs/{running}/cancel").json()["status_detail"] == "cancelling"
            job = wait_all(http, [running], timeout=60)[running]
            seconds_to_cancelled.append(time.monotonic() - requested)
            assert job["status"] == "cancelled" and job["result_files"] == []

            events = event_types(http, running)
            after = events[events.index("cancelling") :]
            steps_after_cancel.append(after.count("metrics"))
            assert steps_after_cancel[-1] <= 2, events[-10:]

            # The queued job never started, even after the worker came free.
            assert "started" not in event_types(http, queued)
            assert http.get(f"/v1/fine_tuning/jobs/{queued}").json()["started_at"] is None

        print(f"\nsteps logged after the cancel: {steps_after_cancel}")
        print(f"seconds from cancel to cancelled: max {max(seconds_to_cancelled):.2f}, all {seconds_to_cancelled}")

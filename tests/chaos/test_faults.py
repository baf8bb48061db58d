"""Faults with nothing lost: the broker forgets its queue, the worker or the API is SIGKILLed."""

from __future__ import annotations

import hashlib
import io
import json
import random
import signal
import tarfile
import threading
import time

import httpx
from safetensors.torch import load

from tests.chaos.conftest import scale
from tests.conftest import emotion_rows

TERMINAL = {"succeeded", "failed", "cancelled"}
SPEC = {"model": "tiny-llama-test", "text_template": "{text} -> {label}", "seed": 11}


def client_for(stack, key) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def dataset(n: int = 10, offset: int = 0) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in emotion_rows(n, offset)).encode()


def upload(http: httpx.Client, content: bytes) -> httpx.Response:
    return http.post("/v1/files", files={"file": ("d.jsonl", content)}, data={"purpose": "fine-tune"})


def wait_all(http: httpx.Client, job_ids, timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    pending = set(job_ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                jobs[job_id] = job
                pending.discard(job_id)
        time.sleep(0.5)
    assert not pending, f"{len(pending)} jobs did not finish in {timeout}s"
    return jobs


def event_types(http: httpx.Client, job_id: str) -> list[str]:
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    return [e["event_type"] for e in reversed(events)]


def adapter_tensors(http: httpx.Client, job: dict) -> dict:
    content = http.get(f"/v1/files/{job['result_files'][0]}/content").content
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        return load(tar.extractfile("adapter_model.safetensors").read())


def test_broker_loss_with_queued_jobs(chaos_stack, private_redis):
    n = scale(ci=6, full=50)
    chaos_stack.start(worker=False)
    with client_for(chaos_stack, chaos_stack.new_key()) as http:
        file_id = upload(http, dataset()).json()["id"]
        job_ids = [
            http.post("/v1/fine_tuning/jobs", json=SPEC | {"training_file": file_id, "max_steps": 1}).json()["id"]
            for _ in range(n)
        ]
        # The broker restarts empty: every queued message is gone.
        private_redis.stop()
        private_redis.start()
        chaos_stack.start_worker()
        jobs = wait_all(http, job_ids, timeout=60 + 10 * n)
        assert {j["status"] for j in jobs.values()} == {"succeeded"}
        for job_id in job_ids:
            # Exactly once: one claim, one success, however many times the reconciler re-sent it.
            kinds = event_types(http, job_id)
            assert kinds.count("started") == 1 and kinds.count("succeeded") == 1, kinds


def wait_until(http: httpx.Client, job_id: str, until, timeout: float) -> dict:
    """The job once `until(job)` holds or it has finished, whichever comes first."""
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if until(job) or job["status"] in TERMINAL:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_worker_killed_at_random_moments(chaos_stack):
    trials = scale(ci=2, full=20)
    rng = random.Random(7)
    chaos_stack.start()
    with client_for(chaos_stack, chaos_stack.new_key()) as http:
        file_id = upload(http, dataset(40)).json()["id"]
        body = SPEC | {
            "training_file": file_id,
            "max_steps": 60,
            "save_every_steps": 5,
            "log_every_steps": 1,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        }
        reference_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
        wait_until(http, reference_id, lambda job: job["status"] != "queued", timeout=120)
        claimed = time.monotonic()
        reference = wait_all(http, [reference_id], timeout=120)[reference_id]
        duration = time.monotonic() - claimed
        expected = adapter_tensors(http, reference)

        redone: list[int] = []
        interrupted: list[str] = []  # jobs whose running attempt a kill cut short
        resumed_at: dict[str, int] = {}  # job -> the checkpoint step its later attempt resumed from
        for trial in range(trials):
            job_id = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
            if trial == 0:
                # One kill lands in training for sure: past the first checkpoint (step 5 is saved before step 6
                # is reported), so that the next attempt has one to resume from.
                running = wait_until(http, job_id, lambda job: (job["progress"]["step"] or 0) >= 6, timeout=120)
                assert running["status"] == "running", running
            else:
                # Somewhere between the claim and the publish: loading, training, saving or publishing.
                wait_until(http, job_id, lambda job: job["status"] != "queued", timeout=120)
                time.sleep(rng.uniform(0, 0.9 * duration))
            chaos_stack.stop_worker(signal.SIGKILL)
            chaos_stack.start_worker()
            job = wait_all(http, [job_id], timeout=180)[job_id]
            assert job["status"] == "succeeded", (job["error"], chaos_stack.log("worker.log"))
            kinds = event_types(http, job_id)
            # A second claim needs the job back in `queued` (the reconciler, after the lease expired):
            # two workers never hold it at once.
            claims = [i for i, k in enumerate(kinds) if k == "started"]
            for earlier, later in zip(claims, claims[1:], strict=False):
                assert "queued" in kinds[earlier:later], kinds
            assert kinds.count("succeeded") == 1
            if len(claims) > 1:
                interrupted.append(job_id)
            # At most one checkpoint interval is redone: each later attempt resumes within 5 steps of where
            # the killed one got to.
            reached = 0
            events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
            for event in reversed(events):
                data = event.get("data") or {}
                if event["event_type"] == "metrics":
                    reached = max(reached, data["step"])
                elif "resumed_from_step" in data and reached:  # a later attempt's start of training
                    resumed = data["resumed_from_step"] or 0
                    assert reached - resumed <= 5, (reached, resumed)
                    redone.append(reached - resumed)
                elif event["message"].startswith("Resumed from the checkpoint"):
                    resumed_at[job_id] = data["step"]
            if job_id in resumed_at:
                assert job["result"]["resumed_from_step"] == resumed_at[job_id], (job["result"], resumed_at)
            got = adapter_tensors(http, job)
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                assert (got[name] - value).abs().max() < 1e-5, name
        print(f"\nsteps redone after each kill (checkpoint every 5): {redone}; resumed from: {resumed_at}")
        # The kills proved something: at least one cut a running attempt short (started, given back to
        # `queued`, started again), and a later attempt resumed from a checkpoint, as its events say.
        assert interrupted, "no kill landed while a job was running"
        assert any(step >= 5 for step in resumed_at.values()), (interrupted, resumed_at)


def test_api_killed_during_uploads_and_creations(chaos_stack):
    n = scale(ci=10, full=50)
    chaos_stack.start()
    key = chaos_stack.new_key()
    accepted_files: dict[str, str] = {}
    accepted_jobs: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        content = dataset(10, offset=i * 10)
        try:
            with client_for(chaos_stack, key) as http:
                response = upload(http, content)
                if response.status_code != 200:
                    return
                with lock:
                    accepted_files[response.json()["id"]] = hashlib.sha256(content).hexdigest()
                job = http.post(
                    "/v1/fine_tuning/jobs", json=SPEC | {"training_file": response.json()["id"], "max_steps": 1}
                )
                if job.status_code == 200:
                    with lock:
                        accepted_jobs.append(job.json()["id"])
        except httpx.HTTPError:
            pass  # the API died under this request: the client saw no 2xx, so nothing was promised

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    # Kill it mid-stream: some requests answered, others in flight or not yet sent.
    deadline = time.monotonic() + 30
    while len(accepted_jobs) < n // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    chaos_stack.stop_api(signal.SIGKILL)
    for thread in threads:
        thread.join()
    chaos_stack.start_api()
    chaos_stack.wait_ready()

    with client_for(chaos_stack, key) as http:
        for file_id, digest in accepted_files.items():
            content = http.get(f"/v1/files/{file_id}/content")
            assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == digest
        # Nothing is listed that cannot be downloaded intact.
        for file in http.get("/v1/files?limit=1000").json()["data"]:
            content = http.get(f"/v1/files/{file['id']}/content")
            assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == file["sha256"]
        jobs = wait_all(http, accepted_jobs, timeout=60 + 10 * n)
        assert {j["status"] for j in jobs.values()} <= {"succeeded"}
    assert accepted_jobs, "the API was killed before it acknowledged anything; the test proved nothing"
    print(f"api killed: {len(accepted_files)} uploads and {len(accepted_jobs)} jobs acknowledged of {n}")

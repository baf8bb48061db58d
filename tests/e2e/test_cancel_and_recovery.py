"""Cancellation and worker death against real processes (PostgreSQL, Redis, Celery)."""

from __future__ import annotations

import signal

from tests.e2e.helpers import sdk, upload_emotion, wait_for

# compile off: auto would compile a 20,000-step CPU run's layers before its first step; these tests stop it early.
LONG_JOB = {"text_template": "{text} -> {label}", "max_steps": 20000, "compile": False, "adapter": {"r": 4, "alpha": 8}}


def metrics_seen(client, job_id) -> int:
    events = client.fine_tuning.jobs.list_events(job_id, limit=5).data
    return sum(1 for e in events if e.type == "metrics")


def test_cancel_running_job_stops_it_and_frees_the_worker(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 20)
    job = client.fine_tuning.jobs.create(model="tiny-llama-test", training_file=training, extra_body=LONG_JOB)
    wait_for(client, job.id, until=lambda j: j.status == "running" and j.model_extra["progress"]["step"] > 0)

    cancelling = client.fine_tuning.jobs.cancel(job.id)
    # OpenAI's enum has no cancelling: the SDK sees running (or cancelled, if the worker was that quick).
    assert (cancelling.status, cancelling.model_extra["status_detail"]) in {
        ("running", "cancelling"),
        ("cancelled", "cancelled"),
    }
    done = wait_for(client, job.id, timeout=30)
    assert done.status == "cancelled" and done.result_files == [] and done.finished_at
    assert done.model_extra["progress"]["step"] < 20000

    kinds = [e.model_extra["event_type"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert kinds.count("cancelled") == 1 and kinds.count("cancelling") == 1 and "succeeded" not in kinds

    # The worker is free for the next job.
    quick = client.fine_tuning.jobs.create(
        model="tiny-llama-test", training_file=training, extra_body=LONG_JOB | {"max_steps": 2}
    )
    assert wait_for(client, quick.id).status == "succeeded"


def test_killed_worker_job_is_requeued_and_finished_by_a_new_worker(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 20)
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test", training_file=training, extra_body=LONG_JOB | {"max_steps": 400}
    )
    wait_for(client, job.id, until=lambda j: j.status == "running" and j.model_extra["progress"]["step"] > 0)

    live.stop_worker(signal.SIGKILL)  # no clean-up, no ack: the lease simply stops being renewed
    live.start_worker()
    done = wait_for(client, job.id, timeout=240)
    assert done.status == "succeeded", (done.error, live.log("worker.log"))
    kinds = [
        e.model_extra["event_type"] for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=1000)))
    ]
    # Started twice, requeued once in between by the reconciler, succeeded once.
    assert kinds.count("started") == 2 and kinds.count("succeeded") == 1
    requeue = kinds.index("queued", kinds.index("started"))
    assert kinds.index("started") < requeue < len(kinds) - 1 - kinds[::-1].index("started")

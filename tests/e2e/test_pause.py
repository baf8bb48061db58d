"""Pause and resume against real processes (PostgreSQL, Redis, uvicorn, a Celery worker), driven by the openai
SDK: a paused job frees its worker, and once resumed it ends with the adapter and losses of an uninterrupted run
of the same seed."""

from __future__ import annotations

import openai
import pytest
from typer.testing import CliRunner

from api.cli import app
from models.job import Job
from tests.e2e.helpers import sdk, upload_emotion, wait_for
from tests.e2e.test_resume import adapter_weights, events_of

# Dropout draws random numbers every step, and gradient accumulation splits each step in two: resuming must
# restore the RNG state and pause only between optimizer steps.
SPEC = {
    "text_template": "{text} ->{label}",
    "max_steps": 200,
    "save_every_steps": 50,
    "keep_checkpoints": 2,
    "log_every_steps": 10,
    "learning_rate": 5e-3,
    "gradient_accumulation_steps": 2,
    "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
}
LONG_JOB = {"text_template": "{text} -> {label}", "max_steps": 20000, "adapter": {"r": 4, "alpha": 8}}


def test_a_paused_job_frees_its_worker_and_resumes_to_the_uninterrupted_result(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 40)
    validation = upload_emotion(client, tmp_path, 12, offset=1000, name="valid.jsonl")

    def start():
        return client.fine_tuning.jobs.create(
            model="tiny-llama-test",
            training_file=training,
            validation_file=validation,
            seed=21,
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
            extra_body=SPEC,
        )

    reference = wait_for(client, start().id)
    assert reference.status == "succeeded", (reference.error, live.log("worker.log"))

    job = start()
    wait_for(
        client,
        job.id,
        until=lambda j: j.status not in ("queued", "running") or j.model_extra["progress"]["step"] >= 30,
    )
    asked = client.fine_tuning.jobs.pause(job.id)
    assert asked.status == "running"  # `pausing`, in OpenAI's words, until the worker has let go
    paused = wait_for(client, job.id, until=lambda j: j.status != "running", timeout=60)
    assert paused.status == "paused", (paused.error, live.log("worker.log"))
    paused_at = paused.model_extra["progress"]["step"]
    assert 30 <= paused_at < 200 and paused.finished_at is None and paused.estimated_finish is None
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # again: unchanged

    # The worker (one, concurrency 1) is free: another job runs to its end while this one stays paused.
    quick = client.fine_tuning.jobs.create(
        model="tiny-llama-test", training_file=training, extra_body=LONG_JOB | {"max_steps": 2}
    )
    assert wait_for(client, quick.id).status == "succeeded"
    still = client.fine_tuning.jobs.retrieve(job.id)
    assert still.status == "paused" and still.model_extra["progress"]["step"] == paused_at

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued"
    done = wait_for(client, job.id)
    assert done.status == "succeeded", (done.error, live.log("worker.log"))

    events = events_of(client, job.id)
    kinds = [e.model_extra["event_type"] for e in events]
    assert kinds.count("pausing") == 1 and kinds.count("paused") == 1 and kinds.count("started") == 2
    assert kinds.index("pausing") < kinds.index("paused") < kinds.index("queued", kinds.index("paused"))
    pause_event = events[kinds.index("paused")]
    assert pause_event.level == "info" and pause_event.data == {"step": paused_at}
    back = [e for e in events if e.message.startswith("Resumed from where the job paused")]
    assert len(back) == 1 and back[0].data["step"] == paused_at
    assert done.model_extra["result"]["resumed_from_step"] == paused_at
    # Not a worker lost: the pause gave its attempt back.
    with live.session() as session:
        assert session.get(Job, job.id).attempts == 1

    # The same adapter and losses as the uninterrupted run.
    ours = adapter_weights(live, key, done, tmp_path, "resumed")
    theirs = adapter_weights(live, key, reference, tmp_path, "reference")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-6, name
    for field in ("train_loss", "valid_loss", "best_step"):
        assert done.model_extra["result"][field] == reference.model_extra["result"][field], field
    assert done.trained_tokens == reference.trained_tokens
    # The pause checkpoint is the worker's own: the published checkpoints are those of the uninterrupted run.
    steps = sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100))
    assert steps == sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(reference.id, limit=100))


def test_a_paused_job_stops_following_and_is_cancelled_at_once(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 20)
    job = client.fine_tuning.jobs.create(model="tiny-llama-test", training_file=training, extra_body=LONG_JOB)
    wait_for(client, job.id, until=lambda j: j.status == "running" and j.model_extra["progress"]["step"] > 0)
    client.fine_tuning.jobs.pause(job.id)
    assert wait_for(client, job.id, until=lambda j: j.status != "running", timeout=60).status == "paused"

    # `grove jobs events --follow` stops at the pause, says how to go on, and exits 4.
    env = {"GROVE_BASE_URL": live.base_url, "GROVE_API_KEY": key, "GROVE_CONFIG": str(tmp_path / "none.toml")}
    followed = CliRunner().invoke(app, ["jobs", "events", job.id, "--follow"], env=env)
    assert followed.exit_code == 4, followed.output
    assert f"grove jobs resume {job.id}" in followed.output

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    kinds = [e.model_extra["event_type"] for e in events_of(client, job.id)]
    assert [k for k in kinds if k in ("pausing", "paused", "cancelled")] == ["pausing", "paused", "cancelled"]
    assert kinds[-1] == "cancelled"
    # A finished job neither pauses nor resumes; the SDK raises OpenAI's error for a 409 naming the job.
    for call in (client.fine_tuning.jobs.pause, client.fine_tuning.jobs.resume):
        with pytest.raises(openai.ConflictError) as refused:
            call(job.id)
        assert job.id in refused.value.message and "cancelled" in refused.value.message

"""A SIGKILLed worker's job resumes from its last checkpoint on the next worker, and ends with the adapter an
uninterrupted run of the same seed produces. Real processes: PostgreSQL, Redis, uvicorn, Celery."""

from __future__ import annotations

import io
import signal
import struct
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.helpers import download, sdk, untar, upload_emotion, wait_for
from worker.archives import unpack_tar

SPEC = {
    "text_template": "{text} ->{label}",
    "max_steps": 300,
    "save_every_steps": 20,
    "keep_checkpoints": 2,
    "log_every_steps": 20,
    "learning_rate": 5e-3,
    # Dropout draws random numbers every step: resuming must restore the RNG state too.
    "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
}


def events_of(client, job_id):
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=1000))))


def adapter_weights(live, key, job, tmp_path, name):
    response = download(live.base_url, key, job.result_files[0])
    assert response.status_code == 200
    return load_file(untar(response.content, tmp_path / name) / "adapter_model.safetensors")


def test_sigkilled_worker_resumes_from_its_last_checkpoint(live, tmp_path):
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
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
            extra_body=SPEC,
        )

    reference = wait_for(client, start().id)
    assert reference.status == "succeeded", (reference.error, live.log("worker.log"))

    job = start()
    running = wait_for(
        client,
        job.id,
        until=lambda j: j.model_extra["progress"]["step"] >= 60 or j.status != "queued" and j.status != "running",
    )
    assert running.status == "running", running.status
    live.stop_worker(signal.SIGKILL)  # no clean-up, no ack: the lease simply stops being renewed
    killed_at = client.fine_tuning.jobs.retrieve(job.id).model_extra["progress"]["step"]
    assert killed_at < 300
    live.start_worker()
    done = wait_for(client, job.id, timeout=240)
    assert done.status == "succeeded", (done.error, live.log("worker.log"))

    events = events_of(client, job.id)
    kinds = [e.model_extra["event_type"] for e in events]
    assert kinds.count("started") == 2 and kinds.count("succeeded") == 1
    resumed = [e for e in events if e.message.startswith("Resumed from the checkpoint")]
    assert len(resumed) == 1
    resumed_step = resumed[0].data["step"]
    assert 40 <= resumed_step <= killed_at and resumed_step % 20 == 0
    assert done.model_extra["result"]["resumed_from_step"] == resumed_step
    # Steps before the checkpoint were not trained again: the second attempt's first metrics come after it.
    second_start = len(kinds) - 1 - kinds[::-1].index("started")
    first_metrics = next(e for e in events[second_start:] if e.type == "metrics")
    assert first_metrics.data["step"] == resumed_step + 20

    # The same adapter as the uninterrupted run, to floating-point tolerance.
    ours = adapter_weights(live, key, done, tmp_path, "resumed")
    theirs = adapter_weights(live, key, reference, tmp_path, "reference")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-6, rtol=0), name

    # The second job on the same file did not tokenize it again.
    def cache_states(job_id):
        return [
            e.data.get("tokenization_cache")
            for e in events_of(client, job_id)
            if "tokenization_cache" in (e.data or {})
        ]

    assert cache_states(reference.id) == ["miss"]
    assert cache_states(job.id) == ["hit", "hit"]

    # Checkpoints: the last two plus the best, with metrics, each downloadable: the adapter, without the
    # training state (it stays on the worker, for resuming).
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=100))
    steps = sorted(c.step_number for c in checkpoints)
    best = done.model_extra["result"]["best_step"]
    assert steps == sorted({280, 300, best})
    assert [c for c in checkpoints if c.model_extra["training_metrics"].get("is_best")][0].step_number == best
    latest = max(checkpoints, key=lambda c: c.step_number)
    assert latest.metrics.full_valid_loss > 0
    archive = download(live.base_url, key, latest.model_extra["file_id"])
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = set(tar.getnames())
    assert {"adapter_model.safetensors", "adapter_config.json", "grove-manifest.json"} <= names
    assert not any(name.startswith("training_state") for name in names)

    # The other result files: metrics CSV, loss plot, TensorBoard events.
    _, metrics_id, plot_id, tensorboard_id = done.result_files
    assert download(live.base_url, key, plot_id).content[:8] == b"\x89PNG\r\n\x1a\n"
    csv_text = download(live.base_url, key, metrics_id).text
    assert csv_text.splitlines()[0].startswith("step,train_loss,valid_loss,learning_rate,tokens_per_second")
    assert len(csv_text.splitlines()) == 1 + 300 // 20  # one row per logged step, none twice
    (tmp_path / "tb.tar").write_bytes(download(live.base_url, key, tensorboard_id).content)
    with tarfile.open(tmp_path / "tb.tar") as tar:
        (member,) = tar.getmembers()
    unpack_tar(tmp_path / "tb.tar", tmp_path / "tb")
    events = tensorboard_events(tmp_path / "tb" / member.name)
    steps = [e.step for e in events if any(v.tag == "loss/train" for v in e.summary.value)]
    assert steps == list(range(20, 301, 20))


def tensorboard_events(path: Path) -> list:
    """The Event protos of a TFRecord file: length (8 bytes), its CRC, payload, payload CRC."""
    from tensorboardX.proto.event_pb2 import Event

    data, at, events = path.read_bytes(), 0, []
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        events.append(Event.FromString(data[at + 12 : at + 12 + length]))
        at += 16 + length
    return events

"""The whole cycle through the official openai SDK, against real server and worker processes.

Runs twice: on PostgreSQL + Redis (production shape) and on SQLite + the SQLite broker (embedded).
"""

from __future__ import annotations

import csv
import hashlib
import io

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.helpers import download, sdk, untar, upload_emotion, wait_for


@pytest.fixture(params=["live", "embedded"])
def stack_and_key(request):
    stack = request.getfixturevalue(request.param)
    key = stack.key if request.param == "embedded" else stack.new_key()
    return stack, key


def test_upload_train_poll_download(stack_and_key, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stack, key = stack_and_key
    client = sdk(stack.base_url, key)
    training = upload_emotion(client, tmp_path, 40)
    validation = upload_emotion(client, tmp_path, 12, offset=1000, name="valid.jsonl")

    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        validation_file=validation,
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={
            "text_template": "{text} -> {label}",
            "max_steps": 12,
            "learning_rate": 5e-3,
            "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    assert job.status == "queued"
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, stack.log("worker.log"))
    assert job.trained_tokens and job.trained_tokens > 0
    # Adapter, metrics CSV, loss plot, TensorBoard events.
    assert job.fine_tuned_model and job.finished_at and len(job.result_files) == 4
    assert job.hyperparameters.batch_size == 4
    assert job.model_extra["progress"] == {"step": 12, "total_steps": 12, "percent": 100.0}

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    kinds = [e.model_extra["event_type"] for e in reversed(events)]
    assert kinds[:3] == ["created", "queued", "started"] and kinds[-1] == "succeeded"
    metrics = [e for e in events if e.type == "metrics"]
    assert {e.data["step"] for e in metrics} == {10, 12}
    last = max(metrics, key=lambda e: e.data["step"])
    assert last.data["total_steps"] == 12 and last.data["train_loss"] > 0 and last.data["valid_loss"] > 0

    adapter_id, metrics_id = job.result_files[:2]
    adapter_file = client.files.retrieve(adapter_id)
    assert adapter_file.purpose == "fine-tune-results" and adapter_file.filename.endswith(".tar")

    response = download(stack.base_url, key, adapter_id)
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content) == adapter_file.bytes
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    ranged = download(stack.base_url, key, adapter_id, Range="bytes=100-199")
    assert ranged.status_code == 206 and ranged.content == response.content[100:200]

    adapter_dir = untar(response.content, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    # lora_B starts at zero: non-zero means training moved it away from its initialisation.
    assert all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert {k for k in saved if "lora_B" in k}
    # The base weights under the adapter are exactly the store's.
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            original = name.replace(".base_layer", "")
            assert torch.equal(value, base_state[original]), name

    table = list(csv.DictReader(io.StringIO(client.files.content(metrics_id).text)))
    assert [row["step"] for row in table] == ["10", "12"]
    assert float(table[-1]["train_loss"]) > 0 and float(table[-1]["valid_loss"]) > 0

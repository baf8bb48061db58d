"""DPO through the official openai SDK, unchanged, against real API and Celery worker processes (PostgreSQL +
Redis): OpenAI's recommended flow, a supervised fine-tune then DPO from its adapter, and a cancelled DPO job."""

from __future__ import annotations

import csv
import io
import json

import openai
import pytest

from tests.conftest import emotion_rows, preference_rows, write_jsonl
from tests.e2e.helpers import download, sdk, untar, wait_for


def upload(client, tmp_path, rows: list[dict], name: str) -> str:
    with write_jsonl(tmp_path / name, rows).open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


def chat_rows(n: int) -> list[dict]:
    """The supervised counterpart of tests.conftest.preference_rows: the same prompt, the label as the reply."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"Emotion of: {r['text']}"},
                {"role": "assistant", "content": r["label"]},
            ]
        }
        for r in emotion_rows(n)
    ]


def dpo(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_supervised_then_dpo_from_its_adapter(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    sft = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=upload(client, tmp_path, chat_rows(24), "sft.jsonl"),
        seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"max_steps": 3, "learning_rate": 5e-3, "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    )
    sft = wait_for(client, sft.id)
    assert sft.status == "succeeded", (sft.error, live.log("worker.log"))

    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=upload(client, tmp_path, preference_rows(16), "pairs.jsonl"),
        validation_file=upload(client, tmp_path, preference_rows(10, offset=1000), "valid-pairs.jsonl"),
        seed=2,
        method=dpo(beta=0.2, batch_size=4, n_epochs=1),
        extra_body={"from_job": sft.id, "log_every_steps": 2, "learning_rate": 5e-3},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_for(client, job.id)
    assert done.status == "succeeded", (done.error, live.log("worker.log"))
    assert done.method.dpo.hyperparameters.beta == 0.2 and done.method.dpo.hyperparameters.batch_size == 4
    assert done.model_extra["adapter"]["r"] == 4  # the supervised job's adapter, continued

    events = list(client.fine_tuning.jobs.list_events(done.id, limit=100))
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [m["step"] for m in metrics] == [2, 4]
    last = metrics[-1]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert isinstance(last[name], float) and isinstance(last[f"valid_{name}"], float), name
    assert 0.0 <= last["valid_rewards/accuracies"] <= 1.0 and last["train_loss"] > 0

    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(done.id))
    # OpenAI's checkpoint metrics type names the supervised keys; DPO's own are beside them.
    assert checkpoints and "full_valid_rewards/accuracies" in checkpoints[0].model_extra["training_metrics"]
    table = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[1]).text)))
    assert [row["step"] for row in table] == ["2", "4"] and table[-1]["valid_rewards/accuracies"] != ""

    response = download(live.base_url, key, done.result_files[0])
    adapter_dir = untar(response.content, tmp_path / "adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_a_dpo_job_is_cancelled_between_steps(live, tmp_path):
    client = sdk(live.base_url, live.new_key())
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=upload(client, tmp_path, preference_rows(16), "pairs.jsonl"),
        method=dpo(batch_size=2),
        extra_body={"max_steps": 5000, "log_every_steps": 1},
    )
    running = wait_for(
        client,
        job.id,
        until=lambda j: j.model_extra["progress"]["step"] >= 2 or j.status != "queued" and j.status != "running",
    )
    assert running.status == "running", (running.status, running.error)
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_for(client, job.id)
    assert done.status == "cancelled" and done.model_extra["progress"]["step"] < 5000
    kinds = [e.model_extra["event_type"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "cancelling" in kinds and kinds[0] == "cancelled"


def test_the_sdk_gets_dpo_mistakes_as_bad_requests(live, tmp_path):
    client = sdk(live.base_url, live.new_key())
    chat = upload(client, tmp_path, chat_rows(12), "chat.jsonl")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="tiny-llama-test", training_file=chat, method=dpo())
    assert refused.value.body["param"] == "training_file" and "line 1" in refused.value.body["message"]
    pairs = upload(client, tmp_path, preference_rows(12), "pairs.jsonl")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="tiny-llama-test", training_file=pairs, method=dpo(beta=-1))
    assert refused.value.body["param"] == "method.dpo.hyperparameters.beta"
    bad = preference_rows(12)
    bad[6] = {"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}
    with pytest.raises(openai.BadRequestError) as refused, write_jsonl(tmp_path / "bad.jsonl", bad).open("rb") as f:
        client.files.create(file=f, purpose="fine-tune")
    assert refused.value.body["message"].startswith("line 7: input.messages must be a non-empty list")

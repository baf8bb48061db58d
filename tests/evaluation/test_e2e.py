"""Against the real API and worker processes (PostgreSQL + Redis): fine-tune -> export -> evaluate.

One fine-tune (its final adapter and its step-5 checkpoint) is exported as a multi-adapter fp32 package; one
evaluation job then scores the base model, both adapters on PyTorch, and both adapters in the ONNX package
selected by name.
"""

from __future__ import annotations

import time

import httpx

from tests.conftest import emotion_rows, write_jsonl
from tests.e2e.helpers import sdk, wait_for

TEMPLATE = "Text: {text}\nEmotion: {label}"


def wait(stack, key: str, path: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.base_url}{path}", headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{path} did not finish; last status {job['status']}")


def test_fine_tune_export_evaluate(live, tmp_path):
    key = live.new_key()
    headers = {"Authorization": f"Bearer {key}"}
    client = sdk(live.base_url, key)
    with write_jsonl(tmp_path / "train.jsonl", emotion_rows(40)).open("rb") as f:
        training = client.files.create(file=f, purpose="fine-tune").id
    with write_jsonl(tmp_path / "val.jsonl", emotion_rows(16, offset=7000)).open("rb") as f:
        validation = client.files.create(file=f, purpose="fine-tune").id

    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8}}},
        extra_body={"text_template": TEMPLATE, "max_steps": 6, "learning_rate": 1e-2, "adapter": {"r": 4, "alpha": 8}},
    )
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, live.log("worker.log"))
    [checkpoint] = [c for c in client.fine_tuning.jobs.checkpoints.list(job.id) if c.step_number == 5]

    export = httpx.post(
        f"{live.base_url}/v1/exports",
        headers=headers,
        json={
            "source": {
                "adapters": [
                    {"fine_tuning_job": job.id, "name": "final"},
                    {"fine_tuning_job": job.id, "checkpoint": checkpoint.id, "name": "step5"},
                ]
            },
            "adapter_mode": "multi",
            "precision": "fp32",
        },
    )
    assert export.status_code == 200, export.text
    export = wait(live, key, f"/v1/exports/{export.json()['id']}")
    assert export["status"] == "succeeded", (export["error"], live.log("worker.log"))

    created = httpx.post(
        f"{live.base_url}/v1/evaluations",
        headers=headers,
        json={
            "evaluation_file": validation,
            "text_template": TEMPLATE,
            "targets": [
                "tiny-llama-test",
                {"fine_tuning_job": job.id, "name": "pt-final"},
                {"fine_tuning_job": job.id, "checkpoint": checkpoint.id, "name": "pt-step5"},
                {"export_job": export["id"], "adapter": "final", "name": "onnx-final"},
                {"export_job": export["id"], "adapter": "step5", "name": "onnx-step5"},
            ],
            "metrics": ["loss", "token_accuracy", "accuracy", "exact_match", "rouge_l"],
            "labels": {"match": "first_mention"},
            "generation": {"max_new_tokens": 6},
        },
    )
    assert created.status_code == 200, created.text
    evaluation = wait(live, key, f"/v1/evaluations/{created.json()['id']}")
    assert evaluation["status"] == "succeeded", (evaluation["error"], live.log("worker.log"))

    summary = evaluation["result"]["summary"]
    assert list(summary) == ["tiny-llama-test", "pt-final", "pt-step5", "onnx-final", "onnx-step5"]
    report = httpx.get(f"{live.base_url}/v1/evaluations/{evaluation['id']}/report", headers=headers).json()
    for adapter in ("final", "step5"):
        pt, onnx = summary[f"pt-{adapter}"], summary[f"onnx-{adapter}"]
        # The exported adapter, activated by name in the package, scores as it does on PyTorch.
        assert abs(pt["loss"] - onnx["loss"]) < 1e-3
        assert pt["exact_match"] == onnx["exact_match"] and pt["accuracy"] == onnx["accuracy"]
        for example in report["examples"]:
            assert example["outputs"][f"pt-{adapter}"]["text"] == example["outputs"][f"onnx-{adapter}"]["text"]
    # The two adapters are different models, and both differ from the base.
    assert len({summary[name]["loss"] for name in ("tiny-llama-test", "pt-final", "pt-step5")}) == 3
    assert {r["target"] for r in evaluation["result"]["comparison"]} == set(list(summary)[1:])
    assert {t["backend"] for t in report["targets"][3:]} == {"onnxruntime-genai"}

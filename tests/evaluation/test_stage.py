"""The evaluation stage run in-process on tiny-llama-test: base model, adapter, checkpoint and ONNX targets in one
job; a target that fails to load; cancel; the automatic evaluation a fine-tune asks for."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import emotion_rows

TEMPLATE = "Text: {text}\nEmotion: {label}"


def run(job_id: str, kind: str = "evaluation") -> str:
    from worker.tasks import run_job

    return run_job(job_id, kind)


@pytest.fixture(scope="module")
def fine_tuned(tenant) -> dict:
    """A succeeded fine-tune (checkpoint at step 5) that asked for an automatic evaluation."""
    training = tenant.upload(emotion_rows(40), "train.jsonl")
    validation = tenant.upload(emotion_rows(12, offset=3000), "val.jsonl")
    job = tenant.post(
        "/v1/fine_tuning/jobs",
        {
            "model": "tiny-llama-test",
            "training_file": training,
            "validation_file": validation,
            "text_template": TEMPLATE,
            "hyperparameters": {"batch_size": 8},
            "max_steps": 6,
            "learning_rate": 0.01,
            "evaluation": {"metrics": ["loss", "accuracy"], "generation": {"max_new_tokens": 4}},
        },
    )
    assert job.status_code == 200, job.text
    assert run(job.json()["id"], "fine_tune") == "done"
    job = tenant.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def crafted_file(tenant, tiny_model) -> tuple[str, int]:
    """20 rows; the even ones expect exactly the base model's greedy output, the odd ones the label."""
    from jobs.evaluation_spec import GenerationSettings
    from tests.evaluation.test_backends import _item
    from worker.eval_backends import TorchBackend
    from worker.eval_data import prompt_ids

    backend = TorchBackend(tiny_model)
    rows = emotion_rows(20, offset=5000)
    items = [_item(i, f"Text: {r['text']}\nEmotion:", f" {r['label']}") for i, r in enumerate(rows)]
    prompts = [prompt_ids(item, backend.tokenizer, 512)[0] for item in items]
    greedy = backend.generate(prompts, GenerationSettings(max_new_tokens=8))
    texts = [backend.tokenizer.decode(ids, skip_special_tokens=True) for ids in greedy]
    assert all(t.strip() for t in texts)
    data = [
        {"prompt": item.prompt, "completion": " " + texts[i].strip() if i % 2 == 0 else f" {rows[i]['label']}"}
        for i, item in enumerate(items)
    ]
    return tenant.upload(data, "crafted.jsonl"), len(data)


def test_base_adapter_checkpoint_and_onnx_in_one_job(tenant, fine_tuned, crafted_file, tiny_onnx):
    file_id, n = crafted_file
    export_id = tenant.export_job(tiny_onnx)
    checkpoints = tenant.get(f"/v1/fine_tuning/jobs/{fine_tuned['id']}/checkpoints").json()["data"]
    checkpoints = [c for c in checkpoints if c["step_number"] == 5]  # the end of the first epoch
    assert len(checkpoints) == 1
    created = tenant.post(
        "/v1/evaluations",
        {
            "evaluation_file": file_id,
            "targets": [
                "tiny-llama-test",
                {"fine_tuning_job": fine_tuned["id"], "name": "adapter"},
                checkpoints[0]["id"],
                {"export_job": export_id},
            ],
            "metrics": ["loss", "perplexity", "token_accuracy", "exact_match", "rouge_l", "bleu"],
            "generation": {"max_new_tokens": 8, "batch_size": 6},
        },
    )
    assert created.status_code == 200, created.text
    evaluation = created.json()
    assert evaluation["object"] == "evaluation" and evaluation["id"].startswith("evaljob-")
    assert evaluation["status"] == "queued"
    names = [t["name"] for t in evaluation["targets"]]
    assert names == ["tiny-llama-test", "adapter", f"{fine_tuned['id']}:step-5", export_id]

    assert run(evaluation["id"]) == "done"
    job = tenant.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 4 * n * 2
    report = tenant.get(f"/v1/evaluations/{evaluation['id']}/report").json()
    downloaded = tenant.get(f"/v1/files/{job['result_files'][0]}/content")
    assert json.loads(downloaded.content) == report

    summary = report["summary"]
    base, onnx = summary["tiny-llama-test"], summary[export_id]
    # The base model on PyTorch and the same model in ONNX fp32: the same generations, the same scores.
    assert base["exact_match"] == onnx["exact_match"] == 0.5
    assert base["rouge_l"] == pytest.approx(onnx["rouge_l"]) and base["bleu"] == pytest.approx(onnx["bleu"])
    assert base["loss"] == pytest.approx(onnx["loss"], rel=1e-4)
    for example in report["examples"]:
        outputs = example["outputs"]
        assert outputs["tiny-llama-test"]["text"] == outputs[export_id]["text"]
        assert (
            outputs["tiny-llama-test"]["exact_match"]
            == outputs[export_id]["exact_match"]
            == (example["index"] % 2 == 0)
        )
    assert len(report["examples"]) == n
    # The adapter changed the model; its checkpoint is another model again.
    assert summary["adapter"]["loss"] != base["loss"]
    assert summary[f"{fine_tuned['id']}:step-5"]["loss"] not in (base["loss"], summary["adapter"]["loss"])

    # Comparison: every later target against the first, metric by metric.
    rows = report["comparison"]
    assert len(rows) == 3 * 6
    for row in rows:
        assert row["baseline_target"] == "tiny-llama-test"
        assert row["value"] == summary[row["target"]][row["metric"]]
        assert row["baseline_value"] == base[row["metric"]]
        assert row["difference"] == pytest.approx(row["value"] - row["baseline_value"], abs=2e-6)
    assert job["result"]["comparison"] == rows and "examples" not in job["result"]

    assert {k: report["generation"][k] for k in ("max_new_tokens", "do_sample", "seed")} == {
        "max_new_tokens": 8, "do_sample": False, "seed": 42,
    }  # fmt: skip
    backends = {t["name"]: t["backend"] for t in report["targets"]}
    assert backends[export_id] == "onnxruntime-genai" and backends["adapter"] == "pytorch"

    events = tenant.get(f"/v1/evaluations/{evaluation['id']}/events?limit=50").json()["data"]
    assert [e["event_type"] for e in events].count("metrics") == 4
    assert events[0]["event_type"] == "succeeded"


def test_a_target_that_fails_to_load_fails_the_job_and_keeps_the_others(tenant, crafted_file, tiny_onnx, tmp_path):
    file_id, n = crafted_file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "genai_config.json").write_text("{this is not json")
    broken_id = tenant.export_job(broken)
    created = tenant.post(
        "/v1/evaluations",
        {"evaluation_file": file_id, "targets": ["tiny-llama-test", broken_id], "metrics": ["loss"]},
    ).json()
    assert run(created["id"]) == "done"
    job = tenant.get(f"/v1/evaluations/{created['id']}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "target_failed" and job["error"]["param"] == "targets[1]"
    assert broken_id in job["error"]["message"]
    assert job["result"]["summary"]["tiny-llama-test"]["loss"] > 0
    assert [t["status"] for t in job["result"]["targets"]] == ["succeeded", "failed"]
    report = tenant.get(f"/v1/evaluations/{created['id']}/report").json()
    assert report["targets"][1]["error"]["message"] and report["comparison"][0]["value"] is None


def test_cancel_stops_a_running_evaluation(tenant):
    file_id = tenant.upload([{"prompt": r["text"], "completion": r["label"]} for r in emotion_rows(300)])
    created = tenant.post(
        "/v1/evaluations",
        {
            "evaluation_file": file_id,
            "targets": ["tiny-llama-test"],
            "metrics": ["exact_match"],
            "generation": {"max_new_tokens": 200, "batch_size": 2},
        },
    ).json()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=run(created["id"])))
    worker.start()
    deadline = time.monotonic() + 60
    while tenant.get(f"/v1/evaluations/{created['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    assert tenant.post(f"/v1/evaluations/{created['id']}/cancel", {}).json()["status"] == "cancelling"
    worker.join(timeout=60)
    assert not worker.is_alive() and time.monotonic() - started < 30
    job = tenant.get(f"/v1/evaluations/{created['id']}").json()
    assert job["status"] == "cancelled" and job["result_files"] == []


def test_fine_tune_asked_for_an_automatic_evaluation(tenant, fine_tuned):
    children = tenant.get(f"/v1/evaluations?parent_id={fine_tuned['id']}").json()["data"]
    assert len(children) == 1
    child_id = children[0]["id"]
    evaluation = tenant.get(f"/v1/evaluations/{child_id}").json()
    assert evaluation["parent_id"] == fine_tuned["id"]
    assert evaluation["evaluation_file"] == fine_tuned["validation_file"]
    assert [t["type"] for t in evaluation["targets"]] == ["model", "fine_tuning_job"]
    assert evaluation["settings"]["text_template"] == TEMPLATE

    assert run(child_id) == "done"
    evaluation = tenant.get(f"/v1/evaluations/{child_id}").json()
    assert evaluation["status"] == "succeeded", evaluation["error"]
    metrics = evaluation["result"]["summary"]
    assert set(metrics) == {"tiny-llama-test", fine_tuned["id"]}
    assert all(set(m) == {"loss", "accuracy"} for m in metrics.values())

    parent = tenant.get(f"/v1/fine_tuning/jobs/{fine_tuned['id']}").json()
    assert parent["result_files"][:2] == fine_tuned["result_files"][:2]
    assert parent["result_files"][-1] == evaluation["result_files"][0]
    events = tenant.get(f"/v1/fine_tuning/jobs/{fine_tuned['id']}/events?limit=100").json()["data"]
    [copied] = [e for e in events if e["event_type"] == "evaluation"]
    assert copied["data"]["metrics"] == metrics and copied["data"]["evaluation_id"] == child_id

"""/v1/exports: creation checks (refused up front with a 4xx naming the field), routing, reads, cancel."""

from __future__ import annotations

import pytest
import redis

from models.config import get_settings
from tests.conftest import REDIS_URL
from tests.export.conftest import create_export


def test_create_resolves_adapters_and_queues_on_the_cpu_queue(client, trained):
    a, b = trained.jobs["a"], trained.jobs["b"]
    response = create_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": a}, {"fine_tuning_job": b, "name": "second"}]},
        precision="int4",
        quantization={"block_size": 16, "accuracy_level": 4},
        metadata={"team": "x"},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "export.job" and job["id"].startswith("exjob-") and job["status"] == "queued"
    assert job["model"] == "tiny-llama-test" and job["adapter_mode"] == "multi"  # the default for several
    assert [(x["name"], x["fine_tuning_job"], x["rank"]) for x in job["adapters"]] == [("a", a, 8), ("second", b, 8)]
    assert job["adapters"][0]["target_modules"] == ["q_proj", "v_proj"]
    assert job["quantization"] == {
        "method": "k_quant",
        "int8_sensitive_layers": True,
        "block_size": 16,
        "accuracy_level": 4,
    }
    assert job["gate"]["min_token_match"] == 0.5 and job["gate"]["max_mean_abs_logit_diff"] > 0
    assert job["queue"] == get_settings().fine_tune_queue and job["metadata"] == {"team": "x"}
    assert job["result_files"] == [] and job["progress"]["step"] == 0

    assert client.get(f"/v1/exports/{job['id']}", headers=trained.auth).json()["id"] == job["id"]
    listed = client.get("/v1/exports?limit=100", headers=trained.auth).json()
    assert job["id"] in [j["id"] for j in listed["data"]]
    # An export is not a fine-tuning job, and the other way round.
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=trained.auth).status_code == 404
    assert client.get(f"/v1/exports/{a}", headers=trained.auth).status_code == 404

    cancelled = client.post(f"/v1/exports/{job['id']}/cancel", headers=trained.auth).json()
    assert cancelled["status"] == "cancelled"
    events = client.get(f"/v1/exports/{job['id']}/events", headers=trained.auth).json()["data"]
    assert [e["event_type"] for e in reversed(events)] == ["created", "queued", "cancelled"]
    assert events[0]["object"] == "export.job.event"


def test_cuda_exports_go_to_the_cuda_queue(client, trained):
    queue = get_settings().export_cuda_queue
    broker = redis.Redis.from_url(REDIS_URL)
    before = broker.llen(queue)
    job = create_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": trained.jobs["a"]}]},
        precision="fp16",
        execution_provider="cuda",
        adapter_mode="separate",
    ).json()
    try:
        assert job["queue"] == queue and job["adapter_mode"] == "separate" and job["precision"] == "fp16"
        assert broker.llen(queue) == before + 1
    finally:
        client.post(f"/v1/exports/{job['id']}/cancel", headers=trained.auth)
        broker.delete(queue)


def test_base_model_export_and_checkpoint_source(client, trained):
    base = create_export(client, trained.auth, source={"model": "tiny-llama-test"}, precision="fp32").json()
    assert base["adapters"] == [] and base["adapter_mode"] is None and base["gate"]["min_token_match"] == 1.0
    checkpoint = trained.checkpoints["a@3"]
    job = create_export(
        client,
        trained.auth,
        source={
            "model": "tiny-llama-test",
            "adapters": [{"fine_tuning_job": trained.jobs["a"], "checkpoint": checkpoint}],
        },
    ).json()
    assert job["adapters"][0]["checkpoint"] == checkpoint and job["adapters"][0]["step"] == 3
    assert job["adapters"][0]["name"] == "a-step-3" and job["adapter_mode"] == "merged"
    for created in (base, job):
        client.post(f"/v1/exports/{created['id']}/cancel", headers=trained.auth)


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"source": {"model": "no-such-model"}}, "source.model", "does not exist"),
        ({"source": {}}, "source.model", "Give source.model"),
        ({"source": {"model": "tiny-llama-test"}, "precision": "fp16"}, "precision", "cannot run on"),
        ({"source": {"model": "tiny-llama-test"}, "adapter_mode": "multi"}, "adapter_mode", "applies only"),
        ({"source": {"model": "tiny-llama-test"}, "precision": "int3"}, "precision", ""),
        ({"source": {"model": "tiny-llama-test"}, "quantization": {"block_size": 48}}, "quantization.block_size", ""),
        ({"source": {"model": "tiny-llama-test"}, "gate": {"min_token_match": 2}}, "gate.min_token_match", ""),
        ({"source": {"model": "tiny-llama-test"}, "surprise": 1}, "surprise", "Unknown field"),
    ],
)
def test_bad_requests_name_the_field(client, trained, body, param, fragment):
    response = create_export(client, trained.auth, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_rank_mismatch_is_refused_naming_the_job(client, trained):
    jobs = trained.jobs
    response = create_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": jobs["a"]}, {"fine_tuning_job": jobs["rank4"]}]},
        adapter_mode="multi",
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "adapter_mismatch" and error["param"] == "source.adapters[1].fine_tuning_job"
    assert jobs["rank4"] in error["message"] and "rank 4" in error["message"]


def test_target_module_mismatch_is_refused_naming_the_job(client, trained):
    jobs = trained.jobs
    response = create_export(
        client,
        trained.auth,
        source={
            "adapters": [
                {"fine_tuning_job": jobs["a"]},
                {"fine_tuning_job": jobs["b"]},
                {"fine_tuning_job": jobs["qkv"]},
            ]
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "adapter_mismatch" and error["param"] == "source.adapters[2].fine_tuning_job"
    assert jobs["qkv"] in error["message"] and "k_proj" in error["message"]


def test_several_adapters_need_multi_and_distinct_names(client, trained):
    jobs = trained.jobs
    two = [{"fine_tuning_job": jobs["a"]}, {"fine_tuning_job": jobs["b"]}]
    response = create_export(client, trained.auth, source={"adapters": two}, adapter_mode="merged")
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapter_mode"
    same = [{"fine_tuning_job": jobs["a"], "name": "x"}, {"fine_tuning_job": jobs["b"], "name": "x"}]
    response = create_export(client, trained.auth, source={"adapters": same})
    assert response.status_code == 400 and response.json()["error"]["param"] == "source.adapters[1].name"
    wrong_base = create_export(
        client, trained.auth, source={"model": "smollm2-135m-instruct", "adapters": [{"fine_tuning_job": jobs["a"]}]}
    )
    assert wrong_base.status_code == 400 and wrong_base.json()["error"]["param"] == "source.model"


def test_another_projects_job_is_not_found(client, auth, trained):
    response = create_export(client, auth, source={"adapters": [{"fine_tuning_job": trained.jobs["a"]}]})
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "source.adapters[0].fine_tuning_job"
    # Nor is another project's export.
    mine = create_export(client, trained.auth, source={"model": "tiny-llama-test"}).json()
    try:
        assert client.get(f"/v1/exports/{mine['id']}", headers=auth).status_code == 404
        assert client.post(f"/v1/exports/{mine['id']}/cancel", headers=auth).status_code == 404
    finally:
        client.post(f"/v1/exports/{mine['id']}/cancel", headers=trained.auth)


def test_unfinished_job_and_foreign_checkpoint_are_refused(client, auth, trained):
    from tests.api.test_files import jsonl, upload
    from tests.conftest import prompt_completion_rows

    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    queued = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": file_id}
    ).json()
    response = create_export(client, auth, source={"adapters": [{"fine_tuning_job": queued["id"]}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "job_not_succeeded"
    client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=auth)

    # b's job with a's checkpoint.
    response = create_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": trained.jobs["b"], "checkpoint": trained.checkpoints["a@3"]}]},
    )
    assert response.status_code == 404 and response.json()["error"]["param"] == "source.adapters[0].checkpoint"


def test_fine_tune_export_section_is_checked_at_creation(client, auth):
    from tests.api.test_files import jsonl, upload
    from tests.conftest import prompt_completion_rows

    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    body = {"model": "tiny-llama-test", "training_file": file_id}
    bad = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json=body | {"export": {"precision": "bf16", "execution_provider": "cpu"}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "export.precision"
    dora = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json=body | {"adapter": {"type": "dora"}, "export": {"adapter_mode": "separate"}},
    )
    assert dora.status_code == 400 and dora.json()["error"]["param"] == "export.adapter_mode"
    good = client.post("/v1/fine_tuning/jobs", headers=auth, json=body | {"export": {"precision": "int8"}})
    assert good.status_code == 200, good.text
    client.post(f"/v1/fine_tuning/jobs/{good.json()['id']}/cancel", headers=auth)

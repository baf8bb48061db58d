"""The sweeps API in-process: bad spaces refused naming the parameter, create/get/list/events, tenancy."""

from __future__ import annotations

import pytest

LR = {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}


@pytest.mark.parametrize(
    ("space", "fields", "param", "words"),
    [
        ({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, {}, "search_space.learning_rate", "greater"),
        ({"r": {"type": "categorical", "values": []}}, {}, "search_space.r", "at least one value"),
        ({"momentum": {"type": "float", "low": 0.1, "high": 0.9}}, {}, "search_space.momentum", "unknown parameter"),
        ({"learning_rate": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, {}, "search_space.learning_rate",
         "log"),
        ({"r": {"type": "float", "low": 2, "high": 8}}, {}, "search_space.r", "integer"),
        ({"r": {"type": "int", "low": 4, "high": 4.5}}, {}, "search_space.r", "whole number"),
        ({"lr": {"type": "categorical", "values": [1e-4, 1e-4]}}, {}, "search_space.lr", "unknown"),
        ({"learning_rate": {"type": "categorical", "values": [1e-4, 1e-4]}}, {}, "search_space.learning_rate",
         "twice"),
        ({"r": LR | {"type": "int", "low": 2, "high": 8}, "adapter.r": {"type": "int", "low": 2, "high": 4}}, {},
         "search_space.adapter.r", "already searched"),
        # Values the fine-tuning API refuses: above the model's rank cap (16 for tiny-llama-test), an unknown scheduler.
        ({"r": {"type": "int", "low": 4, "high": 64}}, {}, "search_space.r", "exceeds"),
        ({"lr_scheduler": {"type": "categorical", "values": ["linear", "sawtooth"]}}, {},
         "search_space.lr_scheduler", "sawtooth"),
        ({"learning_rate": LR}, {"num_trials": 101}, "num_trials", "more trials than this project may queue"),
        ({"learning_rate": LR}, {"max_parallel": 100}, "max_parallel", "at most 100"),
        ({"learning_rate": LR}, {"strategy": "grid"}, "search_space.learning_rate", "grid_points"),
        ({"r": {"type": "categorical", "values": [2, 4]}}, {"strategy": "grid", "num_trials": 3}, "num_trials",
         "only 2"),
        ({"learning_rate": LR | {"grid_points": 3}}, {"strategy": "random"}, "search_space.learning_rate",
         "grid_points"),
        ({"learning_rate": LR}, {"fine_tuning": {"validation_file": None}}, "objective.metric", "validation_file"),
        ({"learning_rate": LR}, {"objective": {"metric": "accuracy"}}, "objective.evaluation_file", "evaluation_file"),
        ({"learning_rate": LR}, {"fine_tuning": {"training_file": "file-nope"}}, "fine_tuning.training_file",
         "file-nope"),
        ({"learning_rate": LR}, {"fine_tuning": {"text_template": "{text} -> {nope}"}}, "fine_tuning.", "nope"),
    ],
)  # fmt: skip
def test_bad_spaces_get_a_400_naming_the_parameter(tenant, space, fields, param, words):
    response = tenant.post("/v1/sweeps", tenant.sweep_body(space, **fields))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"].startswith(param), error
    assert words.lower() in error["message"].lower(), error


def test_a_bad_evaluation_objective_names_its_field(tenant):
    rows = [{"prompt": f"q{i}", "completion": f"a long free text answer {i}"} for i in range(12)]
    free_text = tenant.upload(rows, "free.jsonl")
    response = tenant.post(
        "/v1/sweeps",
        tenant.sweep_body({"learning_rate": LR}, objective={"metric": "accuracy", "evaluation_file": free_text}),
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("objective.evaluation"), response.text


def test_create_get_list_events_and_tenancy(tenant, client):
    from tests.conftest import new_key

    body = tenant.sweep_body(
        {"learning_rate": LR, "r": {"type": "int", "low": 2, "high": 8}},
        num_trials=4,
        max_parallel=2,
        pruning={"n_startup_trials": 1},
        metadata={"team": "a"},
    )
    created = tenant.post("/v1/sweeps", body).json()
    assert created["object"] == "sweep" and created["id"].startswith("sweep-")
    assert created["status"] == "queued" and created["strategy"] == "tpe"
    assert created["num_trials"] == 4 and created["max_parallel"] == 2
    assert created["objective"] == {"metric": "valid_loss", "direction": "minimize"}
    assert created["pruning"]["type"] == "median" and created["pruning"]["n_startup_trials"] == 1
    assert created["trials"] == [] and created["best_trial"] is None and created["progress"]["trials_created"] == 0
    assert created["model"] == "tiny-llama-test" and created["metadata"] == {"team": "a"}
    # No seed was given: one is drawn for the sweep, so its trials differ only in the searched parameters.
    assert 0 <= created["fine_tuning"]["seed"] < 2**31
    assert created["fine_tuning"]["training_file"] == tenant.training
    # The checks created no fine-tuning job.
    assert tenant.get("/v1/fine_tuning/jobs").json()["data"] == []

    assert tenant.get(f"/v1/sweeps/{created['id']}").json()["id"] == created["id"]
    assert created["id"] in [s["id"] for s in tenant.get("/v1/sweeps?limit=100").json()["data"]]
    kinds = [e["event_type"] for e in tenant.get(f"/v1/sweeps/{created['id']}/events").json()["data"]]
    assert set(kinds) == {"created", "queued"}
    assert tenant.get(f"/v1/sweeps/{created['id']}/report").status_code == 404

    other = {"Authorization": f"Bearer {new_key()}"}
    missing = client.get(f"/v1/sweeps/{created['id']}", headers=other)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "sweep_id"
    assert client.post(f"/v1/sweeps/{created['id']}/cancel", headers=other).status_code == 404
    # A sweep is not a fine-tuning job.
    assert tenant.get(f"/v1/fine_tuning/jobs/{created['id']}").status_code == 404


def test_a_queued_sweep_is_cancelled_at_once(tenant):
    from worker.sweep import advance

    sweep = tenant.create({"learning_rate": LR}, num_trials=2)
    cancelled = tenant.post(f"/v1/sweeps/{sweep['id']}/cancel", {}).json()
    # No reconciler runs on this database (live stacks have their own), so nothing started it in between.
    assert cancelled["status"] == "cancelled"
    advance(sweep["id"])
    done = tenant.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "cancelled"
    assert all(t["status"] == "cancelled" for t in done["trials"])


def test_a_retried_create_with_an_idempotency_key_makes_one_sweep(tenant):
    body = tenant.sweep_body({"learning_rate": LR}, num_trials=2)
    headers = tenant.headers | {"Idempotency-Key": "sweep-retry-1"}
    first = tenant.client.post("/v1/sweeps", headers=headers, json=body).json()
    again = tenant.client.post("/v1/sweeps", headers=headers, json=body).json()
    assert first["id"] == again["id"]
    other = tenant.client.post("/v1/sweeps", headers=headers, json=body | {"num_trials": 3})
    assert other.status_code >= 400

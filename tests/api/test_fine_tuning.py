import pytest

from tests.api.test_files import jsonl, upload
from tests.conftest import emotion_rows, prompt_completion_rows


@pytest.fixture
def training_file(client, auth) -> str:
    return upload(client, auth, jsonl(prompt_completion_rows(12))).json()["id"]


@pytest.fixture
def fields_file(client, auth) -> str:
    return upload(client, auth, jsonl(emotion_rows(12))).json()["id"]


def create(client, auth, **body):
    return client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test"} | body)


def test_create_returns_a_queued_openai_job(client, auth, training_file):
    response = create(
        client,
        auth,
        training_file=training_file,
        suffix="emo",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}},
        adapter={"r": 4, "alpha": 8},
        max_steps=5,
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["model"] == "tiny-llama-test"
    assert job["training_file"] == training_file and job["validation_file"] is None
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    assert job["seed"] == 7 and job["metadata"] == {"team": "a"} and job["user_provided_suffix"] == "emo"
    assert job["adapter"]["r"] == 4 and job["max_steps"] == 5
    assert job["error"] is None and job["result_files"] == [] and job["finished_at"] is None

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()
    assert [e["event_type"] for e in events["data"]] == ["queued", "created"]  # newest first
    assert all(e["object"] == "fine_tuning.job.event" and e["type"] == "message" for e in events["data"])

    listed = client.get("/v1/fine_tuning/jobs", headers=auth).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]


def test_cancel_queued_job_is_immediate_and_final(client, auth, training_file):
    job = create(client, auth, training_file=training_file).json()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=auth).json()["data"]
    assert [e["event_type"] for e in events].count("cancelled") == 1


def test_text_template_is_checked_against_the_file(client, auth, fields_file, training_file):
    missing = create(client, auth, training_file=fields_file, text_template="{text} -> {emotion}")
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "text_template" and "'emotion'" in missing.json()["error"]["message"]

    needed = create(client, auth, training_file=fields_file)
    assert needed.status_code == 400 and needed.json()["error"]["param"] == "text_template"

    attribute = create(client, auth, training_file=fields_file, text_template="{text.__class__}")
    assert attribute.status_code == 400 and attribute.json()["error"]["param"] == "text_template"

    wrong_shape = create(client, auth, training_file=training_file, text_template="{prompt}")
    assert wrong_shape.status_code == 400 and wrong_shape.json()["error"]["param"] == "text_template"

    ok = create(client, auth, training_file=fields_file, text_template="{text} -> {label}")
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "no-such-model"}, "model"),
        ({"model": "../../etc"}, "model"),
        ({"model": "/var/models/tiny-llama-test"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"validation_file": "file-doesnotexist"}, "validation_file"),
        ({"adapter": {"r": 64}}, "adapter.r"),
        ({"adapter": {"r": 0}}, "adapter.r"),
        ({"adapter": {"type": "prefix"}}, "adapter.type"),
        ({"max_seq_len": 100000}, "max_seq_len"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": "big"}}}},
            "method.supervised.hyperparameters.batch_size",
        ),
        ({"learning_rate": -1}, "learning_rate"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        ({"method": {"type": "dpo"}}, "training_file"),  # prompt/completion data: a dpo job needs preference pairs
        ({"method": {"type": "reinforcement"}}, "method.type"),
    ],
)
def test_bad_job_specs_name_the_field(client, auth, training_file, body, param):
    response = create(client, auth, **({"training_file": training_file} | body))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_malformed_json_body_is_400(client, auth):
    response = client.post(
        "/v1/fine_tuning/jobs", headers=auth | {"content-type": "application/json"}, content=b"{oops"
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_job_is_404(client, auth):
    for method, path in [("get", ""), ("post", "/cancel"), ("get", "/events"), ("get", "/checkpoints")]:
        response = getattr(client, method)(f"/v1/fine_tuning/jobs/ftjob-nope{path}", headers=auth)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_file_in_use_cannot_be_deleted(client, auth, training_file):
    create(client, auth, training_file=training_file)
    response = client.delete(f"/v1/files/{training_file}", headers=auth)
    assert response.status_code == 409 and response.json()["error"]["param"] == "file_id"


def test_models_lists_the_store(client, auth):
    models = client.get("/v1/models", headers=auth).json()
    tiny = next(m for m in models["data"] if m["id"] == "tiny-llama-test")
    assert tiny["object"] == "model" and tiny["max_lora_rank"] == 16
    assert client.get("/v1/models/tiny-llama-test", headers=auth).json()["id"] == "tiny-llama-test"
    assert client.get("/v1/models/..%2F..%2Fetc", headers=auth).status_code == 404


def test_list_filters_by_metadata_as_the_sdk_sends_it(client, auth, training_file):
    ids = {
        name: create(client, auth, training_file=training_file, metadata=meta).json()["id"]
        for name, meta in {
            "a": {"team": "vision", "stage": "dev"},
            "b": {"team": "vision", "stage": "prod"},
            "c": {"team": "nlp & co", "stage": "dev"},
            "none": None,
        }.items()
    }

    def listed(query: str) -> list[str]:
        response = client.get(f"/v1/fine_tuning/jobs?limit=100&{query}", headers=auth)
        assert response.status_code == 200, response.text
        return sorted(j["id"] for j in response.json()["data"])

    assert listed("metadata%5Bteam%5D=vision") == sorted([ids["a"], ids["b"]])
    assert listed("metadata[team]=vision&metadata[stage]=dev") == [ids["a"]]
    assert listed("metadata[team]=nlp+%26+co") == [ids["c"]]
    assert listed("metadata[team]=nobody") == [] and listed("metadata[owner]=x") == []
    # Paging through a filtered list: `after` is any job id, the filter still holds.
    first = client.get("/v1/fine_tuning/jobs?limit=1&metadata[team]=vision", headers=auth).json()
    assert first["has_more"] is True
    rest = client.get(f"/v1/fine_tuning/jobs?after={first['data'][0]['id']}&metadata[team]=vision", headers=auth)
    assert [j["id"] for j in first["data"] + rest.json()["data"]] == [ids["b"], ids["a"]]  # newest first


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("status=running", "status"),  # a filter OpenAI does not have: refused, never ignored
        ("metadata=team", "metadata"),
        ("metadataX=1", "metadataX"),
        ("metadata[team]=a&metadata[team]=b", "metadata[team]"),
        ("metadata[team][x]=a", "metadata[team][x]"),
        (f"metadata[team]={'v' * 513}", "metadata[team]"),
        ("&".join(f"metadata[k{i}]=v" for i in range(17)), "metadata"),
    ],
)
def test_list_refuses_a_query_parameter_it_would_not_apply(client, auth, query, param):
    response = client.get(f"/v1/fine_tuning/jobs?{query}", headers=auth)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_an_omitted_seed_is_drawn_and_shown(client, auth, training_file):
    drawn = [create(client, auth, training_file=training_file).json()["seed"] for _ in range(3)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**31 for seed in drawn)
    assert len(set(drawn)) == 3  # three draws from 2**31 values
    assert create(client, auth, training_file=training_file, seed=0).json()["seed"] == 0
    retried = [
        client.post(
            "/v1/fine_tuning/jobs",
            headers=auth | {"Idempotency-Key": "seed-once"},
            json={"model": "tiny-llama-test", "training_file": training_file},
        ).json()
        for _ in range(2)
    ]
    assert retried[0]["id"] == retried[1]["id"] and retried[0]["seed"] == retried[1]["seed"]

"""Idempotency-Key: a retried create returns the same object and never makes a second one."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.api.test_files import jsonl, upload
from tests.conftest import new_key, prompt_completion_rows


def test_retried_upload_returns_the_same_file(client, auth):
    body = jsonl(prompt_completion_rows(10))
    headers = auth | {"Idempotency-Key": "upload-1"}
    first = client.post("/v1/files", headers=headers, files={"file": ("a.jsonl", body)}, data={"purpose": "fine-tune"})
    again = client.post("/v1/files", headers=headers, files={"file": ("a.jsonl", body)}, data={"purpose": "fine-tune"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert [f["id"] for f in client.get("/v1/files", headers=auth).json()["data"]] == [first.json()["id"]]

    other = client.post(
        "/v1/files", headers=headers, files={"file": ("a.jsonl", body + body)}, data={"purpose": "fine-tune"}
    )
    assert other.status_code == 422 and other.json()["error"]["param"] == "Idempotency-Key"


def test_retried_job_creation_returns_the_same_job(client, auth):
    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    body = {"model": "tiny-llama-test", "training_file": file_id, "suffix": "x"}
    headers = auth | {"Idempotency-Key": "job-1"}
    first = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()
    again = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()
    assert again["id"] == first["id"]
    assert len(client.get("/v1/fine_tuning/jobs", headers=auth).json()["data"]) == 1
    # Without the key, or with another key, a new job is made.
    assert client.post("/v1/fine_tuning/jobs", headers=auth, json=body).json()["id"] != first["id"]
    changed = client.post("/v1/fine_tuning/jobs", headers=headers, json=body | {"suffix": "y"})
    assert changed.status_code == 422


def test_keys_are_per_project(client, auth):
    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    other_auth = {"Authorization": f"Bearer {new_key()}"}
    other_file = upload(client, other_auth, jsonl(prompt_completion_rows(10))).json()["id"]
    other = other_auth | {"Idempotency-Key": "shared"}
    mine = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth | {"Idempotency-Key": "shared"},
        json={"model": "tiny-llama-test", "training_file": file_id},
    )
    theirs = client.post(
        "/v1/fine_tuning/jobs", headers=other, json={"model": "tiny-llama-test", "training_file": other_file}
    )
    assert mine.status_code == theirs.status_code == 200 and mine.json()["id"] != theirs.json()["id"]


@pytest.mark.parametrize("attempts", [8])
def test_concurrent_retries_make_one_job(live, attempts):
    key = live.new_key()
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=live.base_url, headers=auth, timeout=60) as http:
        file_id = http.post(
            "/v1/files",
            files={"file": ("a.jsonl", jsonl(prompt_completion_rows(10)))},
            data={"purpose": "fine-tune"},
        ).json()["id"]
        body = {"model": "tiny-llama-test", "training_file": file_id, "max_steps": 1}

        def create(_):
            return http.post("/v1/fine_tuning/jobs", headers={"Idempotency-Key": "race"}, json=body)

        with ThreadPoolExecutor(attempts) as pool:
            responses = list(pool.map(create, range(attempts)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert len({r.json()["id"] for r in responses}) == 1
        assert len(http.get("/v1/fine_tuning/jobs").json()["data"]) == 1

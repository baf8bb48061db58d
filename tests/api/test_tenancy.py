from tests.api.test_files import jsonl, upload
from tests.conftest import new_key, prompt_completion_rows


def test_missing_or_wrong_key_is_401(client):
    for headers in ({}, {"Authorization": "Bearer grove-wrong"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/files", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert client.get("/healthz").status_code == 200


def test_another_projects_files_and_jobs_are_404(client):
    owner = {"Authorization": f"Bearer {new_key()}"}
    other = {"Authorization": f"Bearer {new_key()}"}
    file_id = upload(client, owner, jsonl(prompt_completion_rows(10))).json()["id"]
    job_id = client.post(
        "/v1/fine_tuning/jobs", headers=owner, json={"model": "tiny-llama-test", "training_file": file_id}
    ).json()["id"]

    for method, path in [
        ("get", f"/v1/files/{file_id}"),
        ("get", f"/v1/files/{file_id}/content"),
        ("delete", f"/v1/files/{file_id}"),
        ("get", f"/v1/fine_tuning/jobs/{job_id}"),
        ("post", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("get", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("get", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    ]:
        response = getattr(client, method)(path, headers=other)
        assert response.status_code == 404, (method, path, response.text)

    assert client.get("/v1/files", headers=other).json()["data"] == []
    assert client.get("/v1/fine_tuning/jobs", headers=other).json()["data"] == []
    # Using another project's file in a job is refused like a file that does not exist.
    stolen = client.post(
        "/v1/fine_tuning/jobs", headers=other, json={"model": "tiny-llama-test", "training_file": file_id}
    )
    assert stolen.status_code == 400 and stolen.json()["error"]["code"] == "file_not_found"
    # The owner still has everything.
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=owner).json()["status"] == "queued"
    assert client.get(f"/v1/files/{file_id}/content", headers=owner).status_code == 200

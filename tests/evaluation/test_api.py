"""/v1/evaluations: creation, reads, cancel, and every kind of bad input getting a 4xx that names it."""

from __future__ import annotations

import pytest

from models.db import session_scope
from models.ids import new_id
from models.job import Job
from models.job_status import JobStatus
from tests.api.test_files import jsonl, upload
from tests.conftest import emotion_rows, new_key, prompt_completion_rows

TEMPLATE = "Text: {text}\nEmotion: {label}"


@pytest.fixture
def emotion_file(client, auth) -> str:
    return upload(client, auth, jsonl(emotion_rows(12))).json()["id"]


def create(client, auth, **body):
    return client.post("/v1/evaluations", headers=auth, json=body)


def project_of(client, auth) -> str:
    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    with session_scope() as session:
        from models.file import File

        return session.get(File, file_id).project_id


def succeeded_fine_tune(project_id: str) -> str:
    """A finished fine-tuning job row (its adapter is never loaded by these API tests)."""
    with session_scope() as session:
        job = Job(
            id=new_id("ftjob"),
            project_id=project_id,
            kind="fine_tune",
            queue="none",
            model="tiny-llama-test",
            spec={},
            status=JobStatus.succeeded,
            result_files=["file-adapter"],
        )
        session.add(job)
        return job.id


def test_create_get_list_events_cancel(client, auth, emotion_file):
    response = create(
        client,
        auth,
        evaluation_file=emotion_file,
        targets=["tiny-llama-test", {"model": "tiny-llama-test", "name": "again"}],
        text_template=TEMPLATE,
        metrics=["accuracy", "exact_match", "loss"],
        labels={"match": "first_mention"},
        generation={"max_new_tokens": 5, "do_sample": True, "seed": 7},
        metadata={"run": "a"},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued" and job["model"] == "tiny-llama-test" and job["parent_id"] is None
    assert [t["name"] for t in job["targets"]] == ["tiny-llama-test", "again"]
    assert job["metrics"] == ["accuracy", "exact_match", "loss"] and job["metadata"] == {"run": "a"}
    settings = job["settings"]
    assert settings["labels"]["match"] == "first_mention" and settings["text_template"] == TEMPLATE
    assert settings["generation"] | {"max_new_tokens": 5, "do_sample": True, "seed": 7} == settings["generation"]

    assert client.get(f"/v1/evaluations/{job['id']}", headers=auth).json()["id"] == job["id"]
    assert [j["id"] for j in client.get("/v1/evaluations", headers=auth).json()["data"]] == [job["id"]]
    events = client.get(f"/v1/evaluations/{job['id']}/events", headers=auth).json()["data"]
    assert [e["event_type"] for e in events] == ["queued", "created"]
    # The evaluation file is in use until the job finishes.
    assert client.delete(f"/v1/files/{emotion_file}", headers=auth).status_code == 409
    assert client.get(f"/v1/evaluations/{job['id']}/report", headers=auth).status_code == 404

    cancelled = client.post(f"/v1/evaluations/{job['id']}/cancel", headers=auth).json()
    assert cancelled["status"] == "cancelled"
    # Another project, or another kind's resource path, does not see it.
    other = {"Authorization": f"Bearer {new_key()}"}
    assert client.get(f"/v1/evaluations/{job['id']}", headers=other).status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=auth).status_code == 404


def test_duplicate_names_are_made_unique(client, auth, emotion_file):
    job = create(
        client, auth, evaluation_file=emotion_file, targets=["tiny-llama-test"] * 3, text_template=TEMPLATE
    ).json()
    assert [t["name"] for t in job["targets"]] == ["tiny-llama-test", "tiny-llama-test#2", "tiny-llama-test#3"]


def test_metric_that_does_not_fit_the_data(client, auth):
    gsm = upload(client, auth, jsonl([{"prompt": f"q{i}", "completion": f"long answer {i}"} for i in range(10)]))
    response = create(client, auth, evaluation_file=gsm.json()["id"], targets=["tiny-llama-test"], metrics=["accuracy"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "metrics"
    assert "label" in response.json()["error"]["message"]

    unknown = create(client, auth, evaluation_file=gsm.json()["id"], targets=["tiny-llama-test"], metrics=["f1"])
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "metrics.0"


def test_unscorable_files(client, auth, emotion_file):
    no_template = create(client, auth, evaluation_file=emotion_file, targets=["tiny-llama-test"])
    assert no_template.status_code == 400 and no_template.json()["error"]["param"] == "text_template"

    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 10
    chat.append({"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]})
    chat_id = upload(client, auth, jsonl(chat)).json()["id"]
    unanswered = create(client, auth, evaluation_file=chat_id, targets=["tiny-llama-test"])
    assert unanswered.status_code == 400
    assert unanswered.json()["error"]["param"] == "evaluation_file"
    assert unanswered.json()["error"]["message"].startswith("line 11:")

    missing = create(client, auth, evaluation_file="file-nope", targets=["tiny-llama-test"])
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "evaluation_file"


def test_bad_targets(client, auth, emotion_file):
    def error(*targets):
        response = create(client, auth, evaluation_file=emotion_file, targets=list(targets), text_template=TEMPLATE)
        assert 400 <= response.status_code < 500, response.text
        return response.json()["error"]

    assert error("tiny-llama-test", {"model": "no-such-model"})["param"] == "targets[1].model"
    assert error({"model": "tiny-llama-test", "export_job": "x"})["param"] == "targets[0]"
    assert error({"fine_tuning_job": "ftjob-x", "adapter": "a"})["param"] == "targets[0]"
    assert error({"model": "tiny-llama-test", "colour": "red"})["param"] == "targets[0].colour"
    assert error({"fine_tuning_job": "ftjob-nope"})["code"] == "target_not_found"

    training = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    queued = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": training}
    ).json()["id"]
    not_done = error("tiny-llama-test", queued)
    assert not_done["code"] == "target_not_succeeded" and not_done["param"] == "targets[1]"
    assert "queued" in not_done["message"]

    # Another project's succeeded job is not found, whether named as a string or an object.
    theirs = succeeded_fine_tune(project_of(client, {"Authorization": f"Bearer {new_key()}"}))
    assert error({"fine_tuning_job": theirs})["code"] == "target_not_found"
    assert error(theirs)["param"] == "targets[0]"

    mine = succeeded_fine_tune(project_of(client, auth))
    assert error({"fine_tuning_job": mine, "checkpoint": 99})["param"] == "targets[0].checkpoint"
    assert error({"fine_tuning_job": mine, "checkpoint": "ftckpt-nope"})["code"] == "target_not_found"
    ok = create(client, auth, evaluation_file=emotion_file, targets=[mine], text_template=TEMPLATE)
    assert ok.status_code == 200 and ok.json()["targets"][0]["file_id"] == "file-adapter"


def test_multi_adapter_export_needs_an_adapter_name(client, auth, emotion_file):
    project_id = project_of(client, auth)
    adapters = [{"name": "a", "job_id": "ftjob-a", "file": "adapters/a.onnx_adapter"},
                {"name": "b", "job_id": "ftjob-b", "file": "adapters/b.onnx_adapter"}]  # fmt: skip
    with session_scope() as session:
        job = Job(
            id=new_id("exportjob"),
            project_id=project_id,
            kind="export",
            queue="none",
            model="tiny-llama-test",
            spec={},
            status=JobStatus.succeeded,
            result_files=["file-package"],
            result={"adapters": adapters},
        )
        session.add(job)
    unnamed = create(client, auth, evaluation_file=emotion_file, targets=[job.id], text_template=TEMPLATE)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "targets[0].adapter"
    assert "a, b" in unnamed.json()["error"]["message"]
    unknown = create(
        client,
        auth,
        evaluation_file=emotion_file,
        targets=[{"export_job": job.id, "adapter": "c"}],
        text_template=TEMPLATE,
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "targets[0].adapter"
    named = create(
        client,
        auth,
        evaluation_file=emotion_file,
        targets=[{"export_job": job.id, "adapter": "b"}, {"export_job": job.id, "adapter": "ftjob-a"}],
        text_template=TEMPLATE,
    )
    assert named.status_code == 200, named.text
    targets = named.json()["targets"]
    assert [(t["name"], t["adapter"], t["adapter_file"]) for t in targets] == [
        (f"{job.id}:b", "b", "adapters/b.onnx_adapter"),
        (f"{job.id}:a", "a", "adapters/a.onnx_adapter"),
    ]


def test_fine_tune_evaluation_request_is_checked(client, auth, emotion_file):
    training = upload(client, auth, jsonl(emotion_rows(12))).json()["id"]
    body = {"model": "tiny-llama-test", "training_file": training, "text_template": TEMPLATE}
    without_validation = client.post("/v1/fine_tuning/jobs", headers=auth, json=body | {"evaluation": {}})
    assert without_validation.status_code == 400 and without_validation.json()["error"]["param"] == "evaluation"

    free_text = [{"text": f"t{i}", "label": f"free text {i}"} for i in range(10)]
    gsm = upload(client, auth, jsonl(free_text)).json()["id"]
    mismatch = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json=body | {"validation_file": gsm, "evaluation": {"metrics": ["accuracy"]}},
    )
    assert mismatch.status_code == 400 and mismatch.json()["error"]["param"] == "evaluation.metrics"

    ok = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json=body | {"validation_file": emotion_file, "evaluation": {"metrics": ["accuracy"]}},
    )
    assert ok.status_code == 200, ok.text

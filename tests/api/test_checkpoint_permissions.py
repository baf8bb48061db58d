"""Checkpoint permissions: a fine-tune's checkpoint shared with other projects.

In process (no worker): every bad input, who may manage a checkpoint's permissions (its owner and admin keys;
anyone else, a grantee included, gets 404), and that a grant opens the checkpoint and nothing else of the owner's.
Against the live stack (API and worker processes): the official openai SDK drives create, list and delete
unchanged, and a grantee fine-tunes from, evaluates and exports a real checkpoint; a revoke stops new uses at
once while the jobs already created run to the end.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass

import httpx
import pytest
import torch
from safetensors.torch import load_file

from models.db import session_scope
from models.job import Checkpoint
from tests.conftest import emotion_rows, write_jsonl
from tests.e2e.helpers import download, sdk, untar, wait_for

TEMPLATE = "{text} -> {label}"
PERMISSIONS = "/v1/fine_tuning/checkpoints/{}/permissions"


def _project(session_of) -> tuple[str, dict]:
    """A new project and one key of it: (project id, Authorization header)."""
    from api.services.keys import create_key, get_or_create_project

    with session_of() as session:
        project = get_or_create_project(session, f"cp-{uuid.uuid4().hex[:10]}")
        return project.id, {"Authorization": f"Bearer {create_key(session, project)}"}


def _admin(session_of) -> dict:
    from api.services.keys import create_admin_key

    with session_of() as session:
        return {"Authorization": f"Bearer {create_admin_key(session)}"}


def _upload(client, headers, rows, name="train.jsonl") -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows)
    response = client.post("/v1/files", headers=headers, files={"file": (name, body)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _fine_tune(client, headers, training_file: str, **extra) -> httpx.Response:
    body = {"model": "tiny-llama-test", "training_file": training_file, "text_template": TEMPLATE} | extra
    return client.post("/v1/fine_tuning/jobs", headers=headers, json=body)


# --- in process ------------------------------------------------------------------------------------------------


@dataclass
class Shared:
    client: object
    owner_id: str
    owner: dict
    grantee_id: str
    grantee: dict
    stranger: dict
    admin: dict
    job: str
    checkpoint: str  # id
    name: str  # fine_tuned_model_checkpoint
    unpublished: str  # name of a checkpoint with no adapter archive yet
    owner_file: str
    grantee_file: str


@pytest.fixture
def shared(client):
    """An owner's queued fine-tune with two checkpoints (one published), a grantee and a stranger project."""
    owner_id, owner = _project(session_scope)
    grantee_id, grantee = _project(session_scope)
    _, stranger = _project(session_scope)
    owner_file = _upload(client, owner, emotion_rows(24))
    grantee_file = _upload(client, grantee, emotion_rows(24))
    job = _fine_tune(client, owner, owner_file)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    with session_scope() as session:
        published = Checkpoint(job_id=job_id, step=2, metrics={}, file_id=owner_file)
        unpublished = Checkpoint(job_id=job_id, step=3, metrics={})
        session.add_all([published, unpublished])
        session.flush()
        checkpoint_id = published.id
    return Shared(
        client=client,
        owner_id=owner_id,
        owner=owner,
        grantee_id=grantee_id,
        grantee=grantee,
        stranger=stranger,
        admin=_admin(session_scope),
        job=job_id,
        checkpoint=checkpoint_id,
        name=f"tiny-llama-test:ckpt-step-2:{job_id}",
        unpublished=f"tiny-llama-test:ckpt-step-3:{job_id}",
        owner_file=owner_file,
        grantee_file=grantee_file,
    )


def _grant(s: Shared, headers: dict, project_ids, checkpoint: str | None = None) -> httpx.Response:
    return s.client.post(PERMISSIONS.format(checkpoint or s.name), headers=headers, json={"project_ids": project_ids})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "project_ids"),
        ({"project_ids": []}, "project_ids"),
        ({"project_ids": "proj-x"}, "project_ids"),
        ({"project_ids": [7]}, "project_ids.0"),
        ({"project_ids": ["proj-x"] * 101}, "project_ids"),
        ({"project_ids": ["proj-nope"]}, "project_ids[0]"),
        ({"project_ids": ["OWNER"]}, "project_ids[0]"),
        ({"project_ids": ["GRANTEE"], "role": "reader"}, "role"),
    ],
)
def test_bad_grants_are_400_naming_the_field(shared, body, param):
    values = {"OWNER": shared.owner_id, "GRANTEE": shared.grantee_id}
    if isinstance(body.get("project_ids"), list):
        body = body | {"project_ids": [values.get(p, p) for p in body["project_ids"]]}
    response = shared.client.post(PERMISSIONS.format(shared.name), headers=shared.owner, json=body)
    error = _error(response, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    # Nothing was granted by a refused request.
    assert shared.client.get(PERMISSIONS.format(shared.name), headers=shared.owner).json()["data"] == []


@pytest.mark.parametrize(
    "name",
    [
        "ftckpt-nope",
        "nothing",
        "tiny-llama-test:ckpt-step-2:ftjob-nope",
        "tiny-llama-test:ckpt-step-x:JOB",
        "tiny-llama-test:ckpt-step-99999999999999:JOB",
        "other-model:ckpt-step-2:JOB",
        "tiny-llama-test:ckpt-step-9:JOB",
        "tiny-llama-test:step-2:JOB",
    ],
)
def test_unknown_checkpoints_are_404_on_every_route(shared, name):
    name = urllib.parse.quote(name.replace("JOB", shared.job), safe="")
    path = PERMISSIONS.format(name)
    for response in (
        _grant(shared, shared.owner, [shared.grantee_id], checkpoint=name),
        shared.client.get(path, headers=shared.owner),
        shared.client.delete(f"{path}/cp-nope", headers=shared.owner),
    ):
        error = _error(response, 404)
        assert error["code"] == "not_found" and error["param"] == "fine_tuned_model_checkpoint", error


def test_bad_list_queries_are_400(shared):
    for query, param in (("limit=0", "limit"), ("limit=1001", "limit"), ("order=sideways", "order"), ("x=1", "x")):
        response = shared.client.get(f"{PERMISSIONS.format(shared.name)}?{query}", headers=shared.owner)
        assert _error(response, 400)["param"] == param, query


def test_owner_grants_lists_and_revokes(shared):
    s = shared
    third_id, _ = _project(session_scope)
    first = _grant(s, s.owner, [s.grantee_id, third_id, s.grantee_id])
    assert first.status_code == 200, first.text
    page = first.json()
    assert page["object"] == "list" and [p["project_id"] for p in page["data"]] == [s.grantee_id, third_id]
    assert all(p["object"] == "checkpoint.permission" and p["id"].startswith("cp-") for p in page["data"])
    # The same grant again, by id or by name, and by an admin key: the same permissions, no new ones.
    again = _grant(s, s.admin, [third_id], checkpoint=s.checkpoint).json()["data"]
    assert again == [page["data"][1]]
    listed = s.client.get(PERMISSIONS.format(s.name), headers=s.owner).json()
    assert {p["id"] for p in listed["data"]} == {p["id"] for p in page["data"]} and not listed["has_more"]
    one = s.client.get(f"{PERMISSIONS.format(s.name)}?project_id={third_id}", headers=s.admin).json()["data"]
    assert [p["project_id"] for p in one] == [third_id]
    # The names may come percent-encoded (the colons as %3A): the same checkpoint.
    encoded = PERMISSIONS.format(urllib.parse.quote(s.name, safe=""))
    assert len(s.client.get(encoded, headers=s.owner).json()["data"]) == 2

    # A permission is deleted through its own checkpoint only.
    grantee_permission = page["data"][0]["id"]
    assert _error(s.client.delete(f"{PERMISSIONS.format(s.unpublished)}/{grantee_permission}", headers=s.owner), 404)
    deleted = s.client.delete(f"{PERMISSIONS.format(s.name)}/{grantee_permission}", headers=s.owner)
    assert deleted.json() == {"id": grantee_permission, "object": "checkpoint.permission", "deleted": True}
    gone = s.client.delete(f"{PERMISSIONS.format(s.name)}/{grantee_permission}", headers=s.owner)
    assert _error(gone, 404)["param"] == "permission_id"
    assert [p["project_id"] for p in s.client.get(PERMISSIONS.format(s.name), headers=s.owner).json()["data"]] == [
        third_id
    ]


def test_only_the_owner_and_admin_keys_manage_permissions(shared):
    s = shared
    permission = _grant(s, s.owner, [s.grantee_id]).json()["data"][0]["id"]
    path = PERMISSIONS.format(s.name)
    for headers in (s.grantee, s.stranger):  # a grantee uses the checkpoint; it sees nothing of it here
        for response in (
            _grant(s, headers, [s.grantee_id]),
            s.client.get(path, headers=headers),
            s.client.delete(f"{path}/{permission}", headers=headers),
        ):
            error = _error(response, 404)
            assert error["code"] == "not_found" and s.name in error["message"]
    assert [p["id"] for p in s.client.get(path, headers=s.admin).json()["data"]] == [permission]
    assert s.client.delete(f"{path}/{permission}", headers=s.admin).json()["deleted"] is True


def test_a_grant_opens_the_checkpoint_and_nothing_else(shared):
    s = shared
    refused = _fine_tune(s.client, s.grantee, s.grantee_file, from_checkpoint=s.name)
    assert _error(refused, 400)["param"] == "from_checkpoint"
    _grant(s, s.owner, [s.grantee_id])

    for reference in (s.name, s.checkpoint):
        job = _fine_tune(s.client, s.grantee, s.grantee_file, from_checkpoint=reference)
        assert job.status_code == 200, job.text
        assert job.json()["from_checkpoint"] == s.checkpoint  # stored as the id, whichever name was given
    evaluation = s.client.post(
        "/v1/evaluations",
        headers=s.grantee,
        json={"evaluation_file": s.grantee_file, "text_template": TEMPLATE, "targets": [s.name]},
    )
    assert evaluation.status_code == 200, evaluation.text
    [target] = evaluation.json()["targets"]
    assert target["checkpoint_id"] == s.checkpoint and target["file_id"] == s.owner_file

    # A checkpoint of the same job that was not shared, and the job itself: as if they did not exist.
    unshared = _fine_tune(s.client, s.grantee, s.grantee_file, from_checkpoint=s.unpublished)
    assert _error(unshared, 400)["param"] == "from_checkpoint"
    assert _error(_fine_tune(s.client, s.grantee, s.grantee_file, from_job=s.job), 400)["param"] == "from_job"
    for targets in ([{"fine_tuning_job": s.job}], [{"fine_tuning_job": s.job, "checkpoint": 3}], [s.job]):
        body = {"evaluation_file": s.grantee_file, "text_template": TEMPLATE, "targets": targets}
        response = s.client.post("/v1/evaluations", headers=s.grantee, json=body)
        assert _error(response, 400)["param"].startswith("targets[0]"), targets
    export = s.client.post(
        "/v1/exports", headers=s.grantee, json={"source": {"adapters": [{"fine_tuning_job": s.job}]}}
    )
    assert _error(export, 404)["param"] == "source.adapters[0].fine_tuning_job"
    for path in (
        f"/v1/fine_tuning/jobs/{s.job}",
        f"/v1/fine_tuning/jobs/{s.job}/events",
        f"/v1/fine_tuning/jobs/{s.job}/checkpoints",
        f"/v1/files/{s.owner_file}",
        f"/v1/files/{s.owner_file}/content",
    ):
        assert _error(s.client.get(path, headers=s.grantee), 404)["code"] == "not_found", path
    for path in ("/v1/fine_tuning/jobs", "/v1/files"):
        listed = s.client.get(path, headers=s.grantee).text
        assert s.job not in listed and s.owner_file not in listed, path
    assert _error(s.client.post(f"/v1/fine_tuning/jobs/{s.job}/cancel", headers=s.grantee), 404)


def test_a_revoked_grant_stops_new_uses(shared):
    s = shared
    permission = _grant(s, s.owner, [s.grantee_id]).json()["data"][0]["id"]
    assert _fine_tune(s.client, s.grantee, s.grantee_file, from_checkpoint=s.name).status_code == 200
    s.client.delete(f"{PERMISSIONS.format(s.name)}/{permission}", headers=s.owner)
    assert _error(_fine_tune(s.client, s.grantee, s.grantee_file, from_checkpoint=s.name), 400)["code"] == "not_found"
    body = {"evaluation_file": s.grantee_file, "text_template": TEMPLATE, "targets": [s.name]}
    assert _error(s.client.post("/v1/evaluations", headers=s.grantee, json=body), 400)["param"] == "targets[0]"
    source = {"adapters": [{"fine_tuning_job": s.job, "checkpoint": s.name}]}
    export = s.client.post("/v1/exports", headers=s.grantee, json={"source": source})
    assert _error(export, 404)["param"] == "source.adapters[0].fine_tuning_job"
    # The owner still uses its own checkpoint.
    assert _fine_tune(s.client, s.owner, s.owner_file, from_checkpoint=s.name).status_code == 200


# --- against the live stack ------------------------------------------------------------------------------------


def _wait(stack, key: str, path: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.base_url}{path}", headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{path} did not finish; last status {job['status']}")


def _upload_live(client, tmp_path, rows, name: str) -> str:
    with write_jsonl(tmp_path / name, rows).open("rb") as f:
        return client.files.create(file=f, purpose="fine-tune").id


@pytest.fixture(scope="module")
def trained(live, tmp_path_factory):
    """The owner's finished tiny fine-tune: (owner key, job, its last checkpoint)."""
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = _upload_live(client, tmp_path_factory.mktemp("owner"), emotion_rows(16), "train.jsonl")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={
            "text_template": TEMPLATE,
            "max_steps": 2,
            "learning_rate": 5e-2,
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, live.log("worker.log"))
    checkpoint = max(client.fine_tuning.jobs.checkpoints.list(job.id), key=lambda c: c.step_number)
    return key, job, checkpoint


def project_id_of(stack, key: str) -> str:
    from models.project import ApiKey, hash_key

    with stack.session() as session:
        return session.query(ApiKey).filter_by(key_hash=hash_key(key)).one().project_id


def test_the_openai_sdk_creates_lists_and_deletes_permissions(live, trained):
    import openai

    key, _, checkpoint = trained
    owner = sdk(live.base_url, key).fine_tuning.checkpoints.permissions
    grantees = [project_id_of(live, live.new_key()) for _ in range(3)]
    name = checkpoint.fine_tuned_model_checkpoint

    created = owner.create(fine_tuned_model_checkpoint=name, project_ids=grantees)
    assert [p.project_id for p in created.data] == grantees
    assert all(p.object == "checkpoint.permission" and p.created_at > 0 for p in created.data)
    again = owner.create(fine_tuned_model_checkpoint=name, project_ids=grantees[:1])
    assert [p.id for p in again.data] == [created.data[0].id]  # idempotent

    # list() pages through every permission, one per request; retrieve() is the same list, one page.
    listed = list(owner.list(fine_tuned_model_checkpoint=name, limit=1, order="ascending"))
    assert [p.id for p in listed] == sorted(p.id for p in created.data)
    page = owner.retrieve(fine_tuned_model_checkpoint=name, limit=2)
    assert page.object == "list" and page.has_more and [p.id for p in page.data] == [p.id for p in listed[::-1][:2]]
    only = owner.retrieve(fine_tuned_model_checkpoint=name, project_id=grantees[1])
    assert [p.project_id for p in only.data] == [grantees[1]]

    deleted = owner.delete(created.data[1].id, fine_tuned_model_checkpoint=name)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.data[1].id, "checkpoint.permission", True)
    with pytest.raises(openai.NotFoundError):
        owner.delete(created.data[1].id, fine_tuned_model_checkpoint=name)
    assert {p.project_id for p in owner.list(fine_tuned_model_checkpoint=name)} == {grantees[0], grantees[2]}

    # Another project, even one granted the checkpoint, cannot see or change its permissions.
    grantee_key = live.new_key()
    owner.create(fine_tuned_model_checkpoint=name, project_ids=[project_id_of(live, grantee_key)])
    for other_key in (grantee_key, live.new_key()):
        theirs = sdk(live.base_url, other_key).fine_tuning.checkpoints.permissions
        with pytest.raises(openai.NotFoundError):
            theirs.retrieve(fine_tuned_model_checkpoint=name)
        with pytest.raises(openai.NotFoundError):
            theirs.create(fine_tuned_model_checkpoint=name, project_ids=[project_id_of(live, other_key)])
        with pytest.raises(openai.NotFoundError):
            theirs.delete(created.data[0].id, fine_tuned_model_checkpoint=name)


def test_a_grantee_fine_tunes_from_evaluates_and_exports_a_shared_checkpoint(live, trained, tmp_path):
    from peft import PeftModel  # noqa: F401  (the worker's loader; imported here to fail early without it)

    owner_key, owner_job, checkpoint = trained
    name = checkpoint.fine_tuned_model_checkpoint
    grantee_key = live.new_key()
    grantee = sdk(live.base_url, grantee_key)
    headers = {"Authorization": f"Bearer {grantee_key}"}
    training = _upload_live(grantee, tmp_path, emotion_rows(12, offset=500), "mine.jsonl")
    permission = (
        sdk(live.base_url, owner_key)
        .fine_tuning.checkpoints.permissions.create(
            fine_tuned_model_checkpoint=name, project_ids=[project_id_of(live, grantee_key)]
        )
        .data[0]
    )

    # A learning rate too small to move the weights: the grantee's adapter is the checkpoint it started from.
    job = grantee.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"text_template": TEMPLATE, "max_steps": 1, "learning_rate": 1e-12, "from_checkpoint": name},
    )
    evaluation = httpx.post(
        f"{live.base_url}/v1/evaluations",
        headers=headers,
        json={"evaluation_file": training, "text_template": TEMPLATE, "targets": [name], "metrics": ["loss"]},
    )
    assert evaluation.status_code == 200, evaluation.text
    export = httpx.post(
        f"{live.base_url}/v1/exports",
        headers=headers,
        json={
            "source": {"adapters": [{"fine_tuning_job": owner_job.id, "checkpoint": name}]},
            "precision": "fp32",
            "gate": {"n_prompts": 1, "max_new_tokens": 4},
        },
    )
    assert export.status_code == 200, export.text
    [adapter] = export.json()["adapters"]
    assert (adapter["checkpoint"], adapter["step"], adapter["rank"]) == (checkpoint.id, checkpoint.step_number, 4)

    # Revoked at once: no new use. The three jobs created before it run to the end.
    grants = sdk(live.base_url, owner_key).fine_tuning.checkpoints.permissions
    grants.delete(permission.id, fine_tuned_model_checkpoint=name)
    refused = httpx.post(
        f"{live.base_url}/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": "tiny-llama-test", "training_file": training, "text_template": TEMPLATE,
              "from_checkpoint": name},
    )  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "from_checkpoint"

    job = wait_for(grantee, job.id)
    assert job.status == "succeeded", (job.error, live.log("worker.log"))
    mine = untar(download(live.base_url, grantee_key, job.result_files[0]).content, tmp_path / "mine")
    theirs = untar(download(live.base_url, owner_key, checkpoint.model_extra["file_id"]).content, tmp_path / "ckpt")
    started, shared_weights = (
        load_file(mine / "adapter_model.safetensors"),
        load_file(theirs / "adapter_model.safetensors"),
    )
    lora_b = [k for k in shared_weights if "lora_B" in k]
    assert lora_b and set(started) == set(shared_weights)
    assert any(shared_weights[k].abs().max() > 0 for k in lora_b)  # a fresh adapter's B is zero
    for k in shared_weights:
        torch.testing.assert_close(started[k], shared_weights[k], rtol=0, atol=1e-6)

    evaluated = _wait(live, grantee_key, f"/v1/evaluations/{evaluation.json()['id']}")
    assert evaluated["status"] == "succeeded", (evaluated["error"], live.log("worker.log"))
    exported = _wait(live, grantee_key, f"/v1/exports/{export.json()['id']}")
    assert exported["status"] == "succeeded", (exported["error"], live.log("worker.log"))
    assert exported["result"]["adapters"][0]["checkpoint_id"] == checkpoint.id

    # None of the owner's job, events, checkpoints or files reach the grantee.
    for path in (
        f"/v1/fine_tuning/jobs/{owner_job.id}",
        f"/v1/fine_tuning/jobs/{owner_job.id}/events",
        f"/v1/fine_tuning/jobs/{owner_job.id}/checkpoints",
        f"/v1/files/{checkpoint.model_extra['file_id']}/content",
    ):
        assert httpx.get(f"{live.base_url}{path}", headers=headers).status_code == 404, path

"""Grove's responses, read as a strict OpenAI client reads them: every route the `openai` SDK has is answered with a
body that its pydantic type validates in strict mode (exact types, its enums), and whose fields beyond the SDK's
are Grove extensions that Grove's own OpenAPI document declares. A live stack serves them, after a real job ran."""

from __future__ import annotations

import types
import typing

import httpx
import pytest
from openai import BaseModel as SdkModel
from openai.types import FileDeleted, FileObject, Model, Upload
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.checkpoints import (
    PermissionCreateResponse,
    PermissionDeleteResponse,
    PermissionListResponse,
    PermissionRetrieveResponse,
)
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from openai.types.uploads import UploadPart

from tests.api.test_checkpoint_permissions import project_id_of
from tests.conftest import emotion_rows, preference_rows, write_jsonl
from tests.e2e.helpers import sdk, upload_emotion, wait_for

JOB = {"text_template": "{text} -> {label}", "max_steps": 2, "save_every_steps": 1, "adapter": {"r": 4, "alpha": 8}}


def undocumented_fields(sdk_type: type[SdkModel], payload: dict, grove: dict, path: str, resolve) -> list[str]:
    """Fields of `payload` that neither the SDK type nor Grove's OpenAPI schema for it (`grove`) names, and the same
    in each nested SDK object, against the nested schema Grove declares for that field (if any)."""
    declared = grove.get("properties", {})
    found = [f"{path}.{name}" for name in payload if name not in sdk_type.model_fields and name not in declared]
    for name, field in sdk_type.model_fields.items():
        value = payload.get(name)
        nested = [t for t in _members(field.annotation) if isinstance(t, type) and issubclass(t, SdkModel)]
        if isinstance(value, dict) and len(nested) == 1:
            found += undocumented_fields(nested[0], value, resolve(declared.get(name, {})), f"{path}.{name}", resolve)
    return found


def _members(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


class StrictReader:
    """Reads a route's raw JSON and checks it against the SDK type and the route's OpenAPI response schema."""

    def __init__(self, base_url: str, key: str):
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.openapi = self.http.get("/openapi.json").json()
        self.checked: list[str] = []

    def declared(self, method: str, route: str, paged: bool) -> dict:
        schema = self.openapi["paths"][route][method]["responses"]["200"]["content"]["application/json"]["schema"]
        component = self.resolve(schema)
        return self.resolve(component["properties"]["data"]["items"]) if paged else component

    def resolve(self, schema: dict) -> dict:
        """A schema with its $ref followed, and an optional one (anyOf [X, null]) taken as X."""
        refs = [s for s in schema.get("anyOf", []) if "$ref" in s]
        schema = refs[0] if len(refs) == 1 else schema
        while "$ref" in schema:
            schema = self.openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def check(self, method: str, route: str, sdk_type: type[SdkModel], *, paged=False, **params) -> list[dict]:
        """The route's items (one, or a page's), each validated; `params`: `path` values and httpx arguments."""
        url = route.format(**params.pop("path", {}))
        response = self.http.request(method.upper(), url, **params)
        assert response.status_code == 200, (route, response.text)
        body = response.json()
        items = body["data"] if paged else [body]
        if paged:
            assert body["object"] == "list" and isinstance(body["has_more"], bool)
            assert items, f"{route} listed nothing: nothing was checked"
        documented = self.declared(method, route, paged)
        for item in items:
            sdk_type.model_validate(item, strict=True)
            extras = undocumented_fields(sdk_type, item, documented, sdk_type.__name__, self.resolve)
            assert extras == [], extras
        self.checked.append(f"{method.upper()} {route}")
        return items


@pytest.fixture
def finished_job(live, tmp_path):
    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 12)
    job = client.fine_tuning.jobs.create(model="tiny-llama-test", training_file=training, extra_body=JOB)
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done
    return key, done.id, training


def test_every_sdk_route_answers_what_the_sdk_types_accept_in_strict_mode(live, finished_job, tmp_path):
    key, job_id, training = finished_job
    reader = StrictReader(live.base_url, key)
    job = {"path": {"job_id": job_id}}

    spare = write_jsonl(tmp_path / "spare.jsonl", emotion_rows(10))
    [created] = reader.check(
        "post", "/v1/files", FileObject, files={"file": spare.open("rb")}, data={"purpose": "fine-tune"}
    )
    reader.check("get", "/v1/files", FileObject, paged=True)
    reader.check("get", "/v1/files/{file_id}", FileObject, path={"file_id": training})
    reader.check("delete", "/v1/files/{file_id}", FileDeleted, path={"file_id": created["id"]})

    reader.check("get", "/v1/fine_tuning/jobs", FineTuningJob, paged=True)
    reader.check("get", "/v1/fine_tuning/jobs/{job_id}", FineTuningJob, **job)
    events = reader.check("get", "/v1/fine_tuning/jobs/{job_id}/events", FineTuningJobEvent, paged=True, **job)
    assert {event["type"] for event in events} == {"message", "metrics"}
    checkpoints = reader.check(
        "get", "/v1/fine_tuning/jobs/{job_id}/checkpoints", FineTuningJobCheckpoint, paged=True, **job
    )
    assert [c["step_number"] for c in checkpoints] == [2, 1]

    long_job = {"model": "tiny-llama-test", "training_file": training} | JOB | {"max_steps": 20000, "compile": False}
    [running] = reader.check("post", "/v1/fine_tuning/jobs", FineTuningJob, json=long_job)
    client, running_job = sdk(live.base_url, key), {"path": {"job_id": running["id"]}}
    wait_for(client, running["id"], until=lambda j: j.status == "running")
    [pausing] = reader.check("post", "/v1/fine_tuning/jobs/{job_id}/pause", FineTuningJob, **running_job)
    assert (pausing["status"], pausing["status_detail"]) in {("running", "pausing"), ("paused", "paused")}
    wait_for(client, running["id"], until=lambda j: j.status == "paused")
    # The one value outside the SDK's enum: OpenAI's API shows a paused job as `paused`, which its Literal lacks.
    paused = reader.http.get(f"/v1/fine_tuning/jobs/{running['id']}").json()
    assert paused["status"] == "paused"
    FineTuningJob.model_validate(paused | {"status": "queued"}, strict=True)
    [resumed] = reader.check("post", "/v1/fine_tuning/jobs/{job_id}/resume", FineTuningJob, **running_job)
    assert resumed["status"] == "queued"
    [cancelled] = reader.check("post", "/v1/fine_tuning/jobs/{job_id}/cancel", FineTuningJob, **running_job)
    # Resumed, it was queued again or just claimed: cancelled at once, or cancelling (shown running) until it stops.
    assert (cancelled["status"], cancelled["status_detail"]) in {("cancelled", "cancelled"), ("running", "cancelling")}

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(12))
    [preference] = reader.check(
        "post", "/v1/files", FileObject, files={"file": pairs.open("rb")}, data={"purpose": "fine-tune"}
    )
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4}}}
    dpo_job = {"model": "tiny-llama-test", "training_file": preference["id"], "method": dpo, "max_steps": 2}
    [preferring] = reader.check("post", "/v1/fine_tuning/jobs", FineTuningJob, json=dpo_job)
    assert wait_for(client, preferring["id"]).status == "succeeded"
    [preferred] = reader.check("get", "/v1/fine_tuning/jobs/{job_id}", FineTuningJob, path={"job_id": preferring["id"]})
    assert preferred["method"]["type"] == "dpo" and preferred["method"]["dpo"]["hyperparameters"]["beta"] == 0.2

    reader.check("get", "/v1/models", Model, paged=True)
    reader.check("get", "/v1/models/{model_id}", Model, path={"model_id": "tiny-llama-test"})

    content = spare.read_bytes()
    new_upload = {"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(content), "mime_type": "text/jsonl"}
    [upload] = reader.check("post", "/v1/uploads", Upload, json=new_upload)
    upload_path = {"path": {"upload_id": upload["id"]}}
    [part] = reader.check("post", "/v1/uploads/{upload_id}/parts", UploadPart, files={"data": content}, **upload_path)
    [completed] = reader.check(
        "post", "/v1/uploads/{upload_id}/complete", Upload, json={"part_ids": [part["id"]]}, **upload_path
    )
    assert completed["status"] == "completed" and completed["file"]["n_examples"] == 10  # a declared extension
    [abandoned] = reader.check("post", "/v1/uploads", Upload, json=new_upload)
    reader.check("post", "/v1/uploads/{upload_id}/cancel", Upload, path={"upload_id": abandoned["id"]})

    checkpoint = {"fine_tuned_model_checkpoint": checkpoints[0]["fine_tuned_model_checkpoint"]}
    grantee = project_id_of(live, live.new_key())
    permissions = "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions"
    [granted] = reader.check(
        "post", permissions, PermissionCreateResponse, paged=True, path=checkpoint, json={"project_ids": [grantee]}
    )
    reader.check("get", permissions, PermissionListResponse, paged=True, path=checkpoint)
    PermissionRetrieveResponse.model_validate(
        reader.http.get(permissions.format(**checkpoint)).json(), strict=True
    )  # the SDK's retrieve() reads the same page whole
    reader.check(
        "delete", permissions + "/{permission_id}", PermissionDeleteResponse,
        path=checkpoint | {"permission_id": granted["id"]},
    )  # fmt: skip
    assert len(reader.checked) == 25

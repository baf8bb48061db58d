"""Grove's responses, read as a strict OpenAI client reads them: every route the `openai` SDK has is answered with a
body that its pydantic type validates in strict mode (exact types, its enums), and whose fields beyond the SDK's
are Grove extensions that Grove's own OpenAPI document declares. A live stack serves them, after a real job ran."""

from __future__ import annotations

import types
import typing

import httpx
import pytest
from openai import BaseModel as SdkModel
from openai.types import FileDeleted, FileObject, Model
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.conftest import emotion_rows, write_jsonl
from tests.e2e.helpers import sdk, upload_emotion, wait_for

JOB = {"text_template": "{text} -> {label}", "max_steps": 2, "save_every_steps": 1, "adapter": {"r": 4, "alpha": 8}}


def undocumented_fields(sdk_type: type[SdkModel], payload: dict, documented: set[str], path: str) -> list[str]:
    """Fields of `payload` that neither the SDK type nor `documented` (Grove's extensions) names, and the same in
    each nested SDK object (where Grove declares no extensions)."""
    found = [f"{path}.{name}" for name in payload if name not in sdk_type.model_fields and name not in documented]
    for name, field in sdk_type.model_fields.items():
        value = payload.get(name)
        nested = [t for t in _members(field.annotation) if isinstance(t, type) and issubclass(t, SdkModel)]
        if isinstance(value, dict) and len(nested) == 1:
            found += undocumented_fields(nested[0], value, set(), f"{path}.{name}")
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

    def declared(self, method: str, route: str, paged: bool) -> set[str]:
        schema = self.openapi["paths"][route][method]["responses"]["200"]["content"]["application/json"]["schema"]
        component = self._resolve(schema)
        if paged:
            component = self._resolve(component["properties"]["data"]["items"])
        return set(component["properties"])

    def _resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def check(self, method: str, route: str, sdk_type: type[SdkModel], *, paged=False, **params) -> list[dict]:
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
            extras = undocumented_fields(sdk_type, item, documented, sdk_type.__name__)
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

    long_job = {"model": "tiny-llama-test", "training_file": training} | JOB | {"max_steps": 20000}
    [running] = reader.check("post", "/v1/fine_tuning/jobs", FineTuningJob, json=long_job)
    wait_for(sdk(live.base_url, key), running["id"], until=lambda j: j.status == "running")
    [cancelled] = reader.check(
        "post", "/v1/fine_tuning/jobs/{job_id}/cancel", FineTuningJob, path={"job_id": running["id"]}
    )
    # OpenAI's enum, whatever Grove's own status (cancelling until the worker stops).
    assert cancelled["status"] in {"running", "cancelled"} and cancelled["status_detail"] in {"cancelling", "cancelled"}

    reader.check("get", "/v1/models", Model, paged=True)
    reader.check("get", "/v1/models/{model_id}", Model, path={"model_id": "tiny-llama-test"})
    assert len(reader.checked) == 12

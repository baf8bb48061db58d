"""Admin routes of base models: POST /v1/models imports an uploaded archive or GGUF file, DELETE /v1/models/{id}
removes a model no unfinished job uses. Project keys get 403; bad uploads get 400/409/413 naming the problem."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from models.config import get_settings
from tests.api.test_files import jsonl, upload
from tests.conftest import MODEL_STORE, emotion_rows, new_key
from tests.models.gguf_files import write_tiny_gguf

TINY = MODEL_STORE / "tiny-llama-test"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A model store and an import directory of the test's own, for the app and the import process it starts."""
    monkeypatch.setenv("GROVE_MODEL_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("GROVE_MODEL_IMPORT_DIR", str(tmp_path / "import"))
    get_settings.cache_clear()
    yield tmp_path / "store"
    get_settings.cache_clear()


@pytest.fixture
def admin(database) -> dict[str, str]:
    from api.services.keys import create_admin_key
    from models.db import session_scope

    with session_scope() as session:
        return {"Authorization": f"Bearer {create_admin_key(session)}"}


def archive(files: dict[str, bytes | Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def tiny_files(**extra: bytes) -> dict[str, bytes | Path]:
    files = {p.name: p for p in TINY.iterdir() if p.name != "grove-model.json"}
    return files | extra


def post_model(client, headers, name: str, content: bytes, filename: str = "model.tar.gz"):
    return client.post("/v1/models", headers=headers, files={"file": (filename, content)}, data={"name": name})


def test_admin_imports_an_archive_and_deletes_it(client, store, admin):
    name = f"imported-{uuid.uuid4().hex[:8]}"
    project = {"Authorization": f"Bearer {new_key()}"}
    assert post_model(client, project, name, archive(tiny_files())).status_code == 403
    created = post_model(client, admin, name, archive(tiny_files()))
    assert created.status_code == 200, created.text
    body = created.json()
    tiny = json.loads((TINY / "grove-model.json").read_text())
    assert (body["id"], body["object"], body["max_lora_rank"], body["context_length"], body["parameters"]) == (
        name,
        "model",
        16,
        2048,
        tiny["parameters"],
    )
    assert [m["id"] for m in client.get("/v1/models", headers=project).json()["data"]] == [name]
    assert client.get(f"/v1/models/{name}", headers=project).json()["id"] == name
    assert not list((store.parent / "import" / ".uploads").iterdir())  # the upload is not kept

    assert client.delete(f"/v1/models/{name}", headers=project).status_code == 403
    deleted = client.delete(f"/v1/models/{name}", headers=admin)
    assert deleted.status_code == 200 and deleted.json() == {"id": name, "object": "model", "deleted": True}
    assert client.get("/v1/models", headers=project).json()["data"] == []
    assert client.get(f"/v1/models/{name}", headers=project).status_code == 404
    again = client.delete(f"/v1/models/{name}", headers=admin)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"
    assert [p.name for p in store.iterdir() if not p.name.startswith(".lock")] == []


def test_admin_imports_a_gguf_file(client, store, admin, tmp_path):
    name = f"gguf-{uuid.uuid4().hex[:8]}"
    content = write_tiny_gguf(TINY, tmp_path / "tiny.gguf").read_bytes()
    created = post_model(client, admin, name, content, filename="tiny.gguf")
    assert created.status_code == 200, created.text
    assert created.json()["parameters"] == json.loads((TINY / "grove-model.json").read_text())["parameters"]
    assert (store / name / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("files", "param", "code"),
    [
        (tiny_files(**{"pytorch_model.bin": b"\x80\x04K\x01."}), "pytorch_model.bin", "pickle_checkpoint"),
        ({k: v for k, v in tiny_files().items() if k != "tokenizer.json"}, "tokenizer.json", "missing_tokenizer"),
        (
            tiny_files(**{"config.json": json.dumps({"architectures": ["BertModel"], "model_type": "bert"}).encode()}),
            "config.json",
            "unsupported_architecture",
        ),
        (tiny_files(**{"../../outside.json": b"{}"}), "file", "unsafe_archive"),
    ],
)
def test_bad_uploads_are_400_naming_the_problem(client, store, admin, files, param, code):
    name = f"bad-{uuid.uuid4().hex[:8]}"
    refused = post_model(client, admin, name, archive(files))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error
    assert not (store.parent / "outside.json").exists() and not (store.parent / "import" / "outside.json").exists()
    assert [p.name for p in store.iterdir() if not p.name.startswith(".lock")] == []


def test_names_types_and_sizes_are_checked(client, store, admin, monkeypatch):
    name = f"taken-{uuid.uuid4().hex[:8]}"
    assert post_model(client, admin, name, archive(tiny_files())).status_code == 200
    taken = post_model(client, admin, name, archive(tiny_files()))
    assert taken.status_code == 409 and taken.json()["error"]["param"] == "name", taken.text
    assert name in taken.json()["error"]["message"]
    malformed = post_model(client, admin, "../escape", archive(tiny_files()))
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "name"
    wrong_type = post_model(client, admin, f"x-{uuid.uuid4().hex[:6]}", b"PK\x03\x04", filename="model.zip")
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["code"] == "unsupported_file_type"
    not_tar = post_model(client, admin, f"x-{uuid.uuid4().hex[:6]}", b"not a tar at all")
    assert not_tar.status_code == 400 and not_tar.json()["error"]["param"] == "file", not_tar.text
    monkeypatch.setenv("GROVE_MAX_MODEL_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    too_large = post_model(client, admin, f"x-{uuid.uuid4().hex[:6]}", archive(tiny_files()))
    assert too_large.status_code == 413 and "GROVE_MAX_MODEL_UPLOAD_BYTES" in too_large.json()["error"]["message"]
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [name]


def test_a_model_in_use_is_not_deleted(client, store, admin):
    """409 naming the model and the job while a fine-tune on it is unfinished; deleted once it is cancelled."""
    name = f"busy-{uuid.uuid4().hex[:8]}"
    assert post_model(client, admin, name, archive(tiny_files())).status_code == 200
    project = {"Authorization": f"Bearer {new_key()}"}
    file_id = upload(client, project, jsonl(emotion_rows(12))).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        headers=project,
        json={"model": name, "training_file": file_id, "text_template": "{text} -> {label}"},
    )
    assert job.status_code == 200, job.text
    busy = client.delete(f"/v1/models/{name}", headers=admin)
    assert busy.status_code == 409, busy.text
    error = busy.json()["error"]
    assert error["code"] == "model_in_use" and name in error["message"] and job.json()["id"] in error["message"]
    assert client.get(f"/v1/models/{name}", headers=project).status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=project).status_code == 200
    assert client.delete(f"/v1/models/{name}", headers=admin).status_code == 200
    assert client.get(f"/v1/models/{name}", headers=project).status_code == 404

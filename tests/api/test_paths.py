"""No request reaches a server path: model names, uploaded file names and ids in URLs with `../`, absolute
paths and symlinks; models that ship code run it only when allowlisted; weights load from safetensors only.
(Archive members: tests/worker/test_archives.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from models.config import get_settings
from tests.api.test_files import jsonl, upload
from tests.conftest import MODEL_STORE, TMP, emotion_rows

TEMPLATE = "{text} -> {label}"
HOSTILE_NAMES = [
    "../tiny-llama-test",
    "../../../../etc/passwd",
    "/etc/passwd",
    str(MODEL_STORE / "tiny-llama-test"),
    "tiny-llama-test/../tiny-llama-test",
    "./tiny-llama-test",
    "tiny-llama-test/",
    "..",
    ".",
    "..\\..\\windows\\win.ini",
    "~/models",
    "%2e%2e%2ftiny-llama-test",
    "tiny-llama-test\x00",
]


@pytest.fixture
def training_file(client, auth) -> str:
    return upload(client, auth, jsonl(emotion_rows(12))).json()["id"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_model_names_that_are_paths_are_refused_everywhere(client, auth, training_file, name):
    job = {"model": name, "training_file": training_file, "text_template": TEMPLATE}
    response = client.post("/v1/fine_tuning/jobs", headers=auth, json=job)
    # A NUL is refused before any lookup, as in every field (models/request_body.py): still a 400 naming `model`.
    expected_code = None if "\x00" in name else "model_not_found"
    assert response.status_code == 400 and response.json()["error"]["code"] == expected_code, response.text
    assert response.json()["error"]["param"] == "model", response.text
    for path, body in (
        ("/v1/exports", {"source": {"model": name}}),
        ("/v1/evaluations", {"evaluation_file": training_file, "targets": [name], "text_template": TEMPLATE}),
    ):
        response = client.post(path, headers=auth, json=body)
        assert response.status_code == 400, (path, response.text)
    response = client.get(f"/v1/models/{quote(name, safe='')}", headers=auth)
    if name == "tiny-llama-test/":  # the router redirects a trailing slash away: the model itself, not a path
        assert response.json()["id"] == "tiny-llama-test"
    elif name == ".":  # the client resolves the dot segment: GET /v1/models, the list
        assert response.json()["object"] == "list"
    else:
        assert response.status_code == 404, response.text


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """A model store of its own: the tiny test model (copied), and whatever a test lays beside it."""
    root = tmp_path / "models"
    shutil.copytree(MODEL_STORE / "tiny-llama-test", root / "tiny-llama-test")
    monkeypatch.setattr(get_settings(), "model_store_dir", root)
    return root


def _job(client, auth, training_file, model):
    job = {"model": model, "training_file": training_file, "text_template": TEMPLATE}
    return client.post("/v1/fine_tuning/jobs", headers=auth, json=job)


def test_a_symlink_in_the_model_store_is_not_a_model(client, auth, training_file, store, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(store / "tiny-llama-test", outside)  # a complete model, but outside the store
    (store / "linked").symlink_to(outside, target_is_directory=True)
    listed = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
    assert listed == ["tiny-llama-test"]
    assert client.get("/v1/models/linked", headers=auth).status_code == 404
    response = _job(client, auth, training_file, "linked")
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_found"
    assert _job(client, auth, training_file, "tiny-llama-test").status_code == 200  # the store itself works


def _remote_code_model(store: Path, marker: Path) -> Path:
    """tiny-llama-test whose config.json maps AutoModelForCausalLM to code shipped beside it, code that leaves
    a marker file when it runs."""
    model = store / "remote-code"
    shutil.copytree(store / "tiny-llama-test", model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "shipped_code.ShippedForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "shipped_code.py").write_text(
        "from pathlib import Path\n"
        "from transformers import LlamaForCausalLM\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class ShippedForCausalLM(LlamaForCausalLM):\n"
        "    pass\n"
    )
    return model


def test_code_shipped_with_a_model_runs_only_when_an_operator_allowlists_it(
    client, auth, training_file, store, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from models.model_store import load_options

    marker = tmp_path / "remote-code-ran"
    model = _remote_code_model(store, marker)
    response = _job(client, auth, training_file, "remote-code")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "remote_code_not_allowed" and "GROVE_TRUST_REMOTE_CODE_MODELS" in error["message"]
    # The worker's own load options: without the allowlist the shipped code is not imported.
    assert load_options("remote-code")["trust_remote_code"] is False
    loaded = AutoModelForCausalLM.from_pretrained(str(model), **load_options("remote-code"))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()

    monkeypatch.setattr(get_settings(), "trust_remote_code_models", "other-model, remote-code")
    assert _job(client, auth, training_file, "remote-code").status_code == 200
    loaded = AutoModelForCausalLM.from_pretrained(str(model), **load_options("remote-code"))
    assert type(loaded).__name__ == "ShippedForCausalLM" and marker.read_text() == "ran"


def test_base_models_load_from_safetensors_only(store):
    """A model directory with pickled weights only (pytorch_model.bin) does not load: a pickle can run code."""
    import torch

    from worker.eval_backends import TorchBackend

    pickled = store / "pickled"
    shutil.copytree(store / "tiny-llama-test", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        TorchBackend(pickled)
    assert TorchBackend(store / "tiny-llama-test").model is not None  # the same loader, safetensors present


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("../../../../etc/passwd", "passwd"),
        ("/etc/cron.d/evil", "evil"),
        ("..\\..\\windows\\evil.ini", "evil.ini"),
        ("..", "upload.jsonl"),
        ("dir/../..", "upload.jsonl"),
        ("x" * 300 + ".jsonl", "x" * 255),
        ("link.jsonl", "link.jsonl"),
    ],
)
def test_uploaded_file_names_are_display_names_only(client, auth, given, shown):
    from api.content import content_disposition
    from models.db import session_scope
    from models.file import File
    from models.storage import get_storage

    before = {p for p in TMP.rglob("*")}
    response = client.post(
        "/v1/files",
        headers=auth,
        files={"file": (given, jsonl(emotion_rows(10)).encode())},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["filename"] == shown
    with session_scope() as session:
        key = session.get(File, file["id"]).storage_key
    # The content lives under a key the server chose (project and file id), inside the store.
    assert shown not in key and key.endswith(file["id"]) and ".." not in key
    stored = get_storage().path_of(key)
    assert stored.is_file() and stored.is_relative_to(get_settings().storage_dir.resolve())
    # Nothing else appeared anywhere under the test root but that object (and its directories), besides the
    # store's staging area, and no new path anywhere may carry the name the client gave. (Live stacks, whose
    # workers may be busy meanwhile, keep their stores and scratch outside this root.)
    created = {p for p in TMP.rglob("*")} - before
    staging = get_settings().storage_dir.resolve() / "tmp"
    ours = {p for p in created if not p.is_relative_to(staging)}
    assert all(p == stored or stored.is_relative_to(p) for p in ours), ours
    given_name = Path(given.replace("\\", "/")).name
    if given_name not in {"", "..", "."}:
        assert not any(p.name == given_name for p in created), created
    download = client.get(f"/v1/files/{file['id']}/content", headers=auth)
    assert download.status_code == 200 and download.headers["content-disposition"] == content_disposition(shown)


@pytest.mark.parametrize(
    "raw",
    ["..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2Fetc%2Fpasswd", "..%5C..%5Cwin.ini", "objects%2F..%2F..%2Fx"],
)
def test_ids_in_urls_that_are_paths_are_404(client, auth, raw):
    for path in (
        f"/v1/files/{raw}",
        f"/v1/files/{raw}/content",
        f"/v1/evaluations/{raw}/report",
        f"/v1/sweeps/{raw}/report",
        f"/v1/models/{raw}",
    ):
        response = client.get(path, headers=auth)
        assert response.status_code == 404, (path, response.status_code, response.text)
        assert "root:" not in response.text


def test_a_nul_character_is_a_400_not_a_500(client, auth, training_file):
    """PostgreSQL text cannot hold NUL: a request carrying one is refused as bad input (found by fuzzing)."""
    body = {"evaluation_file": training_file, "targets": ["tiny-llama-test\x00"], "text_template": TEMPLATE}
    for response in (
        client.post("/v1/evaluations", headers=auth, json=body),
        client.get("/v1/files/file-%00", headers=auth),
        client.get("/v1/fine_tuning/jobs?after=ftjob-%00", headers=auth),
    ):
        assert response.status_code == 400, response.text
        assert "NUL" in response.json()["error"]["message"]

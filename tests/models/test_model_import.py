"""Importing a base model (models/model_import.py, worker/model_import.py, `grove models import`): a real Hugging Face
directory and a real GGUF file are imported, checked and served; each bad input is refused with a 400 (409 for a
taken name) naming the problem, and leaves nothing in the store; a killed import is never listed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app as cli
from models.config import get_settings
from models.errors import Conflict, InvalidRequest, NotFound
from models.model_import import remove
from models.model_store import list_models, resolve_model
from tests.conftest import MODEL_STORE, REPO
from tests.models.gguf_files import write_tiny_gguf
from worker.model_import import import_model

TINY = MODEL_STORE / "tiny-llama-test"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A model store and an import directory of the test's own (the settings every import reads)."""
    store, imports = tmp_path / "store", tmp_path / "import"
    imports.mkdir()
    monkeypatch.setenv("GROVE_MODEL_STORE_DIR", str(store))
    monkeypatch.setenv("GROVE_MODEL_IMPORT_DIR", str(imports))
    get_settings.cache_clear()
    yield store, imports
    get_settings.cache_clear()


def hf_directory(parent: Path, name: str = "tiny-hf") -> Path:
    """tiny-llama-test's Hugging Face files, without Grove's manifest: what an operator downloads."""
    target = parent / name
    shutil.copytree(TINY, target, ignore=shutil.ignore_patterns("grove-model.json"))
    return target


def new_name() -> str:
    return f"imported-{uuid.uuid4().hex[:8]}"


def logits(model_dir: Path, name: str):
    import torch
    from transformers import AutoModelForCausalLM

    from models.model_store import load_options

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **load_options(name))
    with torch.no_grad():
        return model(torch.tensor([[1, 200, 300, 400, 500]])).logits


def assert_nothing_left(store: Path, name: str) -> None:
    assert name not in [m.name for m in list_models(store)]
    leftovers = [p.name for p in store.iterdir()] if store.exists() else []
    assert not [p for p in leftovers if p == name or p.startswith(".tmp-")], leftovers


def test_imports_a_hugging_face_directory(dirs):
    store, imports = dirs
    name = new_name()
    result = CliRunner().invoke(cli, ["models", "import", str(hf_directory(imports)), "--name", name, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    tiny = json.loads((TINY / "grove-model.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["parameters"], info["context_length"], info["max_lora_rank"]) == (tiny["parameters"], 2048, 16)
    served = resolve_model(name)
    assert served.path == store / name and served.parameters == tiny["parameters"]
    assert [m.name for m in list_models(store)] == [name]
    assert logits(store / name, name).equal(logits(TINY, "tiny-llama-test"))
    assert_nothing_left(store, "no-such-model")  # no staging directory stays behind


def test_imports_a_gguf_file(dirs):
    """The GGUF is dequantized the way `make models` prepares SmolLM2 (worker.prepare_models.dequantize_gguf)."""
    store, imports = dirs
    name = new_name()
    source = write_tiny_gguf(TINY, imports / "tiny.gguf")
    result = CliRunner().invoke(cli, ["models", "import", str(source), "--name", name])
    assert result.exit_code == 0, result.output
    assert f"imported {name}: LlamaForCausalLM" in result.output
    assert {p.name for p in (store / name).iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert resolve_model(name).max_lora_rank == 16
    assert logits(store / name, name).equal(logits(TINY, "tiny-llama-test"))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


def _pickle(directory: Path) -> None:
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle, never loaded


def _no_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").unlink()


def _bert(directory: Path) -> None:
    _edit_config(directory, architectures=["BertModel"], model_type="bert")


def _remote_code(directory: Path) -> None:
    _edit_config(directory, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (directory / "modeling_evil.py").write_text("raise SystemExit('ran code shipped with the weights')\n")


@pytest.mark.parametrize(
    ("spoil", "param", "code", "words"),
    [
        (_pickle, "pytorch_model.bin", "pickle_checkpoint", "pickle checkpoint"),
        (_no_tokenizer, "tokenizer.json", "missing_tokenizer", "no tokenizer"),
        (_bert, "config.json", "unsupported_architecture", "'BertModel'"),
        (_remote_code, "config.json", "remote_code_not_allowed", "GROVE_TRUST_REMOTE_CODE_MODELS"),
    ],
)
def test_bad_model_directories_are_refused(dirs, spoil, param, code, words):
    store, imports = dirs
    name = new_name()
    source = hf_directory(imports)
    spoil(source)
    with pytest.raises(InvalidRequest) as refused:
        import_model(str(source), name)
    assert (refused.value.status_code, refused.value.param, refused.value.code) == (400, param, code)
    assert words in refused.value.message
    assert_nothing_left(store, name)
    # The CLI says the same, on one line, with exit status 1.
    result = CliRunner().invoke(cli, ["models", "import", str(source), "--name", name])
    assert result.exit_code == 1 and words in result.output, result.output


def test_remote_code_is_imported_for_an_allowlisted_name(dirs, monkeypatch):
    store, imports = dirs
    name = new_name()
    source = hf_directory(imports)
    _remote_code(source)
    monkeypatch.setenv("GROVE_TRUST_REMOTE_CODE_MODELS", f"other,{name}")
    get_settings.cache_clear()
    assert import_model(str(source), name)["name"] == name
    assert (store / name / "modeling_evil.py").is_file()


def test_a_taken_or_malformed_name_is_refused(dirs):
    store, imports = dirs
    name = new_name()
    source = hf_directory(imports)
    first = import_model(str(source), name)
    with pytest.raises(Conflict) as taken:
        import_model(str(source), name)
    assert (taken.value.status_code, taken.value.param) == (409, "name") and name in taken.value.message
    assert json.loads((store / name / "grove-model.json").read_text())["created"] == first["created"]
    for bad in ("../escape", "Upper", "", ".hidden", "a/b"):
        with pytest.raises(InvalidRequest) as refused:
            import_model(str(source), bad)
        assert refused.value.param == "name", bad
    assert [m.name for m in list_models(store)] == [name]


def test_sources_outside_the_import_directory_are_refused(dirs, tmp_path):
    store, imports = dirs
    outside = hf_directory(tmp_path, "outside")
    (imports / "link").symlink_to(outside)  # a symlink in the import directory does not reach out either
    for source in (str(outside), str(imports / "link"), str(imports / ".." / "outside")):
        with pytest.raises(InvalidRequest) as refused:
            import_model(source, new_name())
        assert refused.value.code == "source_outside_import_dir" and refused.value.param == "source", source
    # A symlink inside an imported directory is refused, never followed.
    inside = hf_directory(imports)
    (inside / "tokenizer.json").unlink()
    (inside / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        import_model(str(inside), new_name())
    assert list_models(store) == []


def test_archives_are_extracted_safely(dirs):
    store, imports = dirs
    good = imports / "model.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(hf_directory(imports), arcname="tiny-hf")  # a folder inside the archive, as `tar czf` makes it
    name = new_name()
    assert import_model(str(good), name)["parameters"] > 0
    evil = imports / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(TINY / "config.json", arcname="../../escaped.json")
    with pytest.raises(InvalidRequest) as refused:
        import_model(str(evil), new_name())
    assert refused.value.code == "unsafe_archive" and "escaped.json" in refused.value.message
    assert not (store.parent / "escaped.json").exists() and not (store / "escaped.json").exists()
    assert [m.name for m in list_models(store)] == [name]


def test_a_repository_id_needs_the_hub(dirs):
    with pytest.raises(InvalidRequest) as refused:
        import_model("HuggingFaceTB/SmolLM2-135M-Instruct", new_name())
    assert refused.value.code == "hub_unreachable" and "not reachable" in refused.value.message


def test_a_killed_import_is_never_listed(dirs):
    """Killed while its weights are being written: the name is never listed nor resolvable, and can be imported."""
    store, imports = dirs
    name = new_name()
    source = write_tiny_gguf(TINY, imports / "tiny.gguf")
    command = [sys.executable, "-m", "worker.model_import", str(source), "--name", name]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    staged = []
    while not staged and time.monotonic() < deadline and process.poll() is None:
        staged = list(store.glob(f".tmp-import-{name}-*/model.safetensors")) if store.exists() else []
        assert name not in [m.name for m in list_models(store)]
        time.sleep(0.01)
    assert staged, process.communicate()[0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert name not in [m.name for m in list_models(store)]
    with pytest.raises(InvalidRequest):
        resolve_model(name, store)
    assert import_model(str(hf_directory(imports)), name)["name"] == name


def test_remove_takes_a_model_out_whole(dirs):
    store, imports = dirs
    name = new_name()
    import_model(str(hf_directory(imports)), name)
    remove(name)
    assert_nothing_left(store, name)
    with pytest.raises(NotFound):
        remove(name)

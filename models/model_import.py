"""Adding a base model to the model store and taking one out: the checks, the manifest, the atomic publish.

An import stages the model's files in a directory of the store whose name starts with a dot
(`STORE/.tmp-import-NAME-*`): the store lists only entries named like a model (models/model_store.py,
MODEL_NAME, which starts with a letter or digit) that hold a `grove-model.json`, so a staged model is never
listed nor resolvable. `publish` checks the staged files, writes `grove-model.json` last, and renames the
directory into place, under the store's lock, where a name already taken is refused: a half-imported model is
never visible, and a crash leaves only a dot-directory (`remove_stale` clears old ones).

What a model must be to be served (`check_model_dir`, each failure a 400 naming the problem):
- weights in safetensors only: any pickle-format file (*.bin, *.pt, *.pth, *.ckpt, *.pkl, *.pickle) is refused,
  even beside safetensors, since a loader might pick it up;
- a config.json naming one architecture of SUPPORTED_ARCHITECTURES (the decoders both LoRA training and the
  ONNX export builder handle);
- a tokenizer (tokenizer.json, or a SentencePiece tokenizer.model);
- no `auto_map` (code shipped with the weights) unless the name is in GROVE_TRUST_REMOTE_CODE_MODELS.

The manifest records what the store serves: the parameter count (from the safetensors headers, without
loading a tensor), the context length (config's max_position_embeddings) and max_lora_rank (a quarter of the
hidden size, at most 64: 64 for SmolLM2-135M, 16 for tiny-llama-test, as prepared models record).

Removal renames the directory to a dot-name first, then deletes it: a model is listed whole or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from models.config import get_settings
from models.errors import Conflict, InvalidRequest, NotFound
from models.model_store import MANIFEST, MODEL_NAME, trusts_remote_code

SUPPORTED_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    }
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_LORA_RANK = 64
STAGING_PREFIX = ".tmp-import-"
STALE_SECONDS = 6 * 3600
# A safetensors header is a few hundred KB even for large models; a bigger one is not a safetensors file.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def store_dir() -> Path:
    return get_settings().model_store_dir


def check_name(name: str, store: Path | None = None) -> str:
    """A new model's name: one lowercase path component, not already in the store (400 / 409, param `name`)."""
    if not MODEL_NAME.match(name or ""):
        raise InvalidRequest(
            f"Model name {name!r} is not valid: 1 to 100 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit.",
            param="name",
            code="invalid_model_name",
        )
    if (store or store_dir()).joinpath(name).exists():
        raise Conflict(f"A model named {name!r} already exists in the model store.", param="name")
    return name


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """One import or removal at a time per store (across processes): the name check and the rename are one step."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".lock-import", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def new_staging_dir(name: str, store: Path | None = None) -> Path:
    """An empty, invisible directory inside the store (same filesystem: the publish is a rename)."""
    store = store or store_dir()
    store.mkdir(parents=True, exist_ok=True)
    remove_stale(store)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=store))


def remove_stale(store: Path) -> None:
    """Staging directories left by an import that crashed, once older than any import takes."""
    now = time.time()
    for leftover in store.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if leftover.is_dir() and now - leftover.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


def model_root(staged: Path) -> Path:
    """The directory holding config.json: the staged directory itself, or its one subdirectory (an archive of
    a folder, `tar czf m.tgz my-model/`)."""
    if (staged / "config.json").is_file():
        return staged
    entries = [p for p in staged.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return staged


def _read_config(root: Path) -> dict:
    path = root / "config.json"
    if not path.is_file():
        raise InvalidRequest("The model has no config.json.", param="config.json", code="missing_config")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidRequest(f"config.json is not valid JSON: {error}.", param="config.json") from None
    if not isinstance(config, dict):
        raise InvalidRequest("config.json is not a JSON object.", param="config.json")
    return config


def _safetensors_parameters(path: Path) -> int:
    """Elements of every tensor in one safetensors file, read from its header (8-byte length + JSON)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than its header")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"header of {length} bytes")
        header = json.loads(handle.read(length))
    total = 0
    for key, tensor in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for size in tensor["shape"]:
            count *= int(size)
        total += count
    return total


def check_model_dir(root: Path, name: str) -> dict:
    """Check a staged model directory (see the module docstring) and return its manifest fields."""
    files = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
    links = [p for p in files if p.is_symlink()]
    if links:
        raise InvalidRequest(
            f"{links[0].relative_to(root)} is a symbolic link; a model holds regular files only.", param="source"
        )
    pickles = sorted(str(p.relative_to(root)) for p in files if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InvalidRequest(
            f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; Grove takes weights in "
            "safetensors only (convert it with transformers' save_pretrained(safe_serialization=True)).",
            param=pickles[0],
            code="pickle_checkpoint",
        )
    config = _read_config(root)
    if config.get("auto_map") and not trusts_remote_code(name):
        raise InvalidRequest(
            f"config.json has an auto_map: the model ships Python code that loading it would run. Grove imports "
            f"it only when an operator lists {name!r} in GROVE_TRUST_REMOTE_CODE_MODELS.",
            param="config.json",
            code="remote_code_not_allowed",
        )
    architectures = config.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise InvalidRequest(
            f"Architecture {architecture!r} (config.json) is not supported; Grove trains and exports "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}.",
            param="config.json",
            code="unsupported_architecture",
        )
    if not any((root / tokenizer).is_file() for tokenizer in TOKENIZER_FILES):
        raise InvalidRequest(
            f"The model has no tokenizer ({' or '.join(TOKENIZER_FILES)}).",
            param="tokenizer.json",
            code="missing_tokenizer",
        )
    weights = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not weights:
        raise InvalidRequest("The model has no *.safetensors weights.", param="model.safetensors", code="no_weights")
    try:
        parameters = sum(_safetensors_parameters(p) for p in weights)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidRequest(
            f"A weights file is not valid safetensors: {error}.", param="model.safetensors", code="invalid_weights"
        ) from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    hidden = config.get("hidden_size") or text.get("hidden_size")
    context = config.get("max_position_embeddings") or text.get("max_position_embeddings")
    if not isinstance(hidden, int) or not isinstance(context, int):
        raise InvalidRequest(
            "config.json lacks hidden_size or max_position_embeddings.", param="config.json", code="invalid_config"
        )
    return {
        "architecture": architecture,
        "parameters": parameters,
        "context_length": context,
        "max_lora_rank": max(1, min(MAX_LORA_RANK, hidden // 4)),
    }


def publish(staged: Path, name: str, description: str, source: str, store: Path | None = None) -> dict:
    """Check the staged model, write its manifest, and rename it into the store as `name`. The staged directory
    is removed whether it is published or refused. Returns the manifest."""
    store = store or store_dir()
    try:
        root = model_root(staged)
        info = {"name": name, "description": description, **check_model_dir(root, name), "source": source}
        info["created"] = int(time.time())
        (root / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(root, 0o755)  # mkdtemp makes it 0700, and tar or safetensors may write 0600 files
        for path in root.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        with store_lock(store):
            check_name(name, store)
            os.rename(root, store / name)
        return info
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def remove(name: str, store: Path | None = None) -> None:
    """Take model `name` out of the store: renamed aside (it stops being listed at once), then deleted."""
    store = store or store_dir()
    with store_lock(store):
        path = store / name
        if not MODEL_NAME.match(name) or path.is_symlink() or not (path / MANIFEST).is_file():
            raise NotFound("model", name, param="model")
        aside = Path(tempfile.mkdtemp(prefix=f".tmp-delete-{name}-", dir=store))
        os.rename(path, aside / name)
    shutil.rmtree(aside, ignore_errors=True)

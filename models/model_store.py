"""Base models available to workers: one directory per name under the model store.

A model is ready when its `grove-model.json` exists (worker.prepare_models writes it last). Names are
resolved only against this directory; a spec can never point at an arbitrary server path: a name is one
lowercase path component (no `/`, no `..`), and an entry of the store that is a symlink is not a model.

A model whose config.json maps its classes to Python code shipped with it (`auto_map`) runs that code
when loaded (transformers' trust_remote_code); such a model is refused unless an operator lists it in
GROVE_TRUST_REMOTE_CODE_MODELS. Weights load from safetensors only (`load_options`), never from pickles.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from models.config import get_settings
from models.errors import InvalidRequest

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
MANIFEST = "grove-model.json"


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    path: Path
    created: int
    max_lora_rank: int
    context_length: int
    description: str
    parameters: int | None
    architecture: str | None = None  # the Hugging Face class (config.json's architectures[0])


def _architecture(path: Path, meta: dict) -> str | None:
    if meta.get("architecture"):
        return str(meta["architecture"])
    try:
        return (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError):
        return None


def _load(path: Path) -> BaseModelInfo | None:
    manifest = path / MANIFEST
    if path.is_symlink() or not manifest.is_file():
        return None
    meta = json.loads(manifest.read_text())
    return BaseModelInfo(
        name=path.name,
        path=path,
        created=int(meta.get("created", 0)),
        max_lora_rank=int(meta.get("max_lora_rank", 64)),
        context_length=int(meta.get("context_length", 2048)),
        description=meta.get("description", ""),
        parameters=meta.get("parameters"),
        architecture=_architecture(path, meta),
    )


def list_models(store: Path | None = None) -> list[BaseModelInfo]:
    store = store or get_settings().model_store_dir
    if not store.is_dir():
        return []
    found = (_load(p) for p in sorted(store.iterdir()) if p.is_dir() and MODEL_NAME.match(p.name))
    return [m for m in found if m is not None]


def resolve_model(name: str, store: Path | None = None, param: str = "model") -> BaseModelInfo:
    store = store or get_settings().model_store_dir
    if not MODEL_NAME.match(name):
        raise InvalidRequest(
            f"Model {name!r} is not a model name in the model store.", param=param, code="model_not_found"
        )
    info = _load(store / name)
    if info is None:
        available = ", ".join(m.name for m in list_models(store)) or "none"
        raise InvalidRequest(
            f"Model {name!r} does not exist. Available models: {available}.",
            param=param,
            code="model_not_found",
        )
    if needs_remote_code(info.path) and not trusts_remote_code(name):
        raise InvalidRequest(
            f"Model {name!r} ships its own Python code (auto_map in its config.json), which Grove runs only for "
            "models an operator lists in GROVE_TRUST_REMOTE_CODE_MODELS.",
            param=param,
            code="remote_code_not_allowed",
        )
    return info


def needs_remote_code(model_dir: Path) -> bool:
    """Whether loading the model would import code from its directory (config.json's `auto_map`)."""
    config = model_dir / "config.json"
    try:
        return config.is_file() and bool(json.loads(config.read_text()).get("auto_map"))
    except (OSError, ValueError, AttributeError):
        return False


def trusts_remote_code(name: str) -> bool:
    """Only a model an operator allowlisted (GROVE_TRUST_REMOTE_CODE_MODELS) may run code shipped with it."""
    allowed = {n.strip() for n in get_settings().trust_remote_code_models.split(",") if n.strip()}
    return name in allowed


def load_options(name: str, weights: bool = True) -> dict:
    """from_pretrained keyword arguments for base model `name`: local files only, its code only if allowlisted,
    and (for weights) safetensors only. `weights=False` for tokenizers and configs."""
    options: dict = {"local_files_only": True, "trust_remote_code": trusts_remote_code(name)}
    if weights:
        options["use_safetensors"] = True
    return options

"""Base models available to workers: one directory per name under the model store.

A model is ready when its `grove-model.json` exists (worker.prepare_models writes it last). Names are
resolved only against this directory; a spec can never point at an arbitrary server path.
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


def _load(path: Path) -> BaseModelInfo | None:
    manifest = path / MANIFEST
    if not manifest.is_file():
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
    return info

"""The tokenization cache: a file's encoding (worker.data.encode_examples), stored once per project and reused
by every job of that project that reads the same file with the same template and tokenizer, at any max_seq_len.

Entries are keyed by project, file content hash, template and tokenizer (cache_key), and kept in the project's
own directory (project_cache_dir). Jobs report whether they hit: with a cache shared between projects, a hit
would tell one tenant that another had uploaded the very file it trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from models.datasets import Example
from worker.data import StopCheck, encode_examples

# Bump when the encoding of examples changes: cached encodings of older versions are then ignored.
DATA_CACHE_VERSION = 1

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".data", ".msgpack", ".h5")


def tokenizer_fingerprint(model_dir: Path) -> str:
    """Hash of a model directory's small files (tokenizer, chat template, config), not its weights."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != "grove-model.json":
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(file_sha256: str, text_template: str | None, tokenizer_hash: str, *, project_id: str) -> str:
    """Identifies one file's encoding in one project: its content, how it is rendered, and the tokenizer.

    A project never hits another's entry (and its jobs report the hit or miss): a shared entry would tell a
    tenant that some other project had trained on the very file it uploads."""
    material = json.dumps([DATA_CACHE_VERSION, project_id, file_sha256, text_template, tokenizer_hash])
    return hashlib.sha256(material.encode()).hexdigest()


def load_cached(cache_dir: Path, key: str) -> list[tuple[list[int], list[int]]] | None:
    import numpy as np

    path = cache_dir / f"{key}.npz"
    try:
        with np.load(path) as saved:
            ids, labels, lengths = saved["input_ids"], saved["labels"], saved["lengths"]
    except (OSError, KeyError, ValueError):
        return None  # absent, or unreadable (written by another version): encode again
    ends = np.cumsum(lengths)
    starts = ends - lengths
    ids_list, labels_list = ids.tolist(), labels.tolist()
    return [(ids_list[a:b], labels_list[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def store_cached(cache_dir: Path, key: str, encoded: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Path:
    """Write atomically: a reader sees the whole file or none."""
    import numpy as np

    cache_dir.mkdir(parents=True, exist_ok=True)
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    flat_ids = np.fromiter((t for ids, _ in encoded for t in ids), dtype=np.int32, count=int(lengths.sum()))
    flat_labels = np.fromiter((t for _, labs in encoded for t in labs), dtype=np.int32, count=int(lengths.sum()))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, input_ids=flat_ids, labels=flat_labels, lengths=lengths)
        os.replace(tmp, cache_dir / f"{key}.npz")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return cache_dir / f"{key}.npz"


def project_cache_dir(cache_root: Path, project_id: str) -> Path:
    """The project's own directory of the tokenization cache (its entries' keys name the project too)."""
    if Path(project_id).name != project_id or project_id in {"", ".", ".."}:
        raise ValueError(f"not a project id: {project_id!r}")
    return cache_root / project_id


def encode_cached(
    load: Callable[[], Sequence[Example]],
    tokenizer,
    cache_dir: Path | None,
    key: str | None,
    check_stop: StopCheck | None = None,
) -> tuple[list[tuple[list[int], list[int]]], bool]:
    """(encoded examples, whether they came from the cache). `load` is called only on a miss."""
    if cache_dir is not None and key is not None:
        cached = load_cached(cache_dir, key)
        if cached is not None:
            return cached, True
    encoded = encode_examples(load(), tokenizer, check_stop)
    if cache_dir is not None and key is not None:
        store_cached(cache_dir, key, encoded)
    return encoded, False

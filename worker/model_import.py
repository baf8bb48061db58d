"""Importing a base model from a source: a local Hugging Face directory, a GGUF file, a tar archive of a
directory, or a Hugging Face repository id (only where the hub is reachable).

The source's files are staged in an invisible directory of the model store (a GGUF file is dequantized there by
worker.prepare_models.dequantize_gguf, as `make models` prepares SmolLM2), then checked and published by
models.model_import: the model is listed whole or not at all.

A local source must lie inside GROVE_MODEL_IMPORT_DIR (after resolving symlinks). An archive is extracted with
worker.archives.unpack_tar: regular files and directories only, none outside the destination.

    python -m worker.model_import SOURCE --name NAME [--description TEXT]

prints the manifest as JSON; a refused import prints {"error": {...}} (OpenAI's envelope, with the HTTP status
under "status") and exits 2. `grove models import` calls `import_model` in-process; POST /v1/models runs this
command as a child process, so that torch and the dequantization stay out of the API process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

from models.config import get_settings
from models.errors import GroveError, InvalidRequest
from models.model_import import check_name, new_staging_dir, publish
from worker.archives import ArchiveRefused, regular_files, unpack_tar

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
HUB_URL = "https://huggingface.co"
# Files of a repository worth downloading: never pickles, never code.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def local_source(source: str) -> Path:
    """`source` as a path inside the import directory (400 naming `source` otherwise)."""
    allowed = get_settings().model_import_dir
    path = Path(source).expanduser().resolve()
    if not path.is_relative_to(allowed):
        raise InvalidRequest(
            f"{source} is outside the import directory {allowed} (GROVE_MODEL_IMPORT_DIR); copy the model there.",
            param="source",
            code="source_outside_import_dir",
        )
    if not path.exists():
        raise InvalidRequest(f"{source} does not exist.", param="source", code="source_not_found")
    return path


def _copy_directory(source: Path, staged: Path) -> None:
    # Regular files only: a symlink in the source (to a file anywhere on the server) is refused, never followed.
    link = next((p for p in source.rglob("*") if p.is_symlink()), None)
    if link is not None:
        raise InvalidRequest(
            f"{link.relative_to(source)} is a symbolic link; import a directory of regular files.", param="source"
        )
    for path in regular_files(source):
        target = staged / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def _unpack(archive: Path, staged: Path) -> None:
    try:
        unpack_tar(archive, staged)
    except ArchiveRefused as error:
        raise InvalidRequest(
            f"The archive was refused: {error}.",
            param="file",
            code="unsafe_archive",
        ) from None
    except (tarfile.TarError, EOFError, OSError) as error:
        raise InvalidRequest(f"The file is not a readable tar archive: {error}.", param="file") from None


def _dequantize(gguf_file: Path, staged: Path) -> None:
    from worker.prepare_models import dequantize_gguf

    try:
        dequantize_gguf(gguf_file, staged)
    except Exception as error:  # any failure to read an operator's or uploader's file is bad input, not ours
        raise InvalidRequest(
            f"The GGUF file could not be read as a model transformers supports: {error}.",
            param="file",
            code="invalid_gguf",
        ) from None


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the Hugging Face hub answers; else why not."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    import httpx

    try:
        httpx.head(HUB_URL, timeout=timeout)
    except httpx.HTTPError as error:
        return f"{HUB_URL} did not answer ({type(error).__name__})"
    return None


def _download(repo_id: str, staged: Path) -> None:
    why = hub_reachable()
    if why is not None:
        raise InvalidRequest(
            f"{repo_id!r} is not a file or directory in the import directory, and the Hugging Face hub is not "
            f"reachable from this machine ({why}). Download the model where the hub is reachable and import the "
            "directory instead.",
            param="source",
            code="hub_unreachable",
        )
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, local_dir=str(staged), allow_patterns=HUB_PATTERNS)
    shutil.rmtree(staged / ".cache", ignore_errors=True)


def stage(source: str, staged: Path) -> str:
    """Put the source's model files into `staged`; return how the manifest records the source."""
    looks_local = source.startswith(("/", ".", "~")) or Path(source).exists()
    if REPO_ID.match(source) and not looks_local:
        _download(source, staged)
        return f"hf:{source}"
    path = local_source(source)
    if path.is_dir():
        _copy_directory(path, staged)
    elif path.name.lower().endswith(".gguf"):
        _dequantize(path, staged)
    elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
        _unpack(path, staged)
    else:
        raise InvalidRequest(
            f"{source}: give a Hugging Face model directory, a .gguf file or a .tar/.tar.gz archive.",
            param="source",
            code="unsupported_source",
        )
    return f"import:{path.name}"


def import_model(source: str, name: str, description: str = "", store: Path | None = None) -> dict:
    """Import `source` as base model `name`; returns its manifest. Raises GroveError (400/409) on bad input."""
    check_name(name, store)
    staged = new_staging_dir(name, store)
    try:
        recorded = stage(source, staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return publish(staged, name, description or f"Imported from {recorded}.", recorded, store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.model_import", description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("--name", required=True)
    parser.add_argument("--description", default="")
    args = parser.parse_args(argv)
    try:
        info = import_model(args.source, args.name, args.description)
    except GroveError as error:
        print(json.dumps({"error": error.to_dict(), "status": error.status_code}), flush=True)
        return 2
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Base models over HTTP for admin keys: import one from an uploaded archive or GGUF file, delete one no job uses.

An upload is streamed to GROVE_MODEL_IMPORT_DIR (held to GROVE_MAX_MODEL_UPLOAD_BYTES, api/upload_form.py),
then imported by `python -m worker.model_import` in a child process: the checks and the atomic publish are
models/model_import.py's, a GGUF file's dequantization is worker.prepare_models' (torch stays out of the API
process). The request waits for it: seconds for an archive of tiny-llama-test, minutes for a GGUF file (the same
dequantization took 592 s for Gemma 3 270M on two busy cores, docs/BENCHMARKS.md), at most
GROVE_MODEL_IMPORT_TIMEOUT_SECONDS; a client must allow for that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.upload_form import UploadForm
from models.config import get_settings
from models.errors import Conflict, GroveError, InvalidRequest
from models.job import Job
from models.job_status import TERMINAL
from models.model_import import check_name, remove
from models.model_store import BaseModelInfo, resolve_model

UPLOAD_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gguf")
UPLOAD_FIELDS = {"name": check_name}


class ImportFailed(GroveError):
    """The import process died or timed out: not the uploader's fault."""


def _suffix(filename: str | None) -> str:
    lowered = (filename or "").lower()
    for suffix in UPLOAD_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    raise InvalidRequest(
        f"file: {filename!r} is neither a tar archive of a Hugging Face model directory (.tar, .tar.gz, .tgz) "
        "nor a .gguf file.",
        param="file",
        code="unsupported_file_type",
    )


def _run_import(path: Path, name: str) -> dict:
    settings = get_settings()
    command = [sys.executable, "-m", "worker.model_import", str(path), "--name", name]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=settings.model_import_timeout_seconds, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImportFailed(
            f"The import took longer than {settings.model_import_timeout_seconds:g} s "
            "(GROVE_MODEL_IMPORT_TIMEOUT_SECONDS) and was stopped; nothing was added.",
            code="import_timeout",
        ) from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        answer = None
    if done.returncode == 0 and isinstance(answer, dict) and "name" in answer:
        return answer
    if done.returncode == 2 and isinstance(answer, dict) and "error" in answer:
        error = answer["error"]
        kind = Conflict if answer.get("status") == 409 else InvalidRequest
        raise kind(error["message"], param=error.get("param"), code=error.get("code"))
    raise ImportFailed(
        f"The import process failed (exit {done.returncode}): {done.stderr.strip()[-500:]}", code="import_failed"
    )


def import_upload(form: UploadForm) -> BaseModelInfo:
    """Stream the uploaded file to the import directory, import it, return the new model."""
    uploads = get_settings().model_import_dir / ".uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=uploads))
    try:
        chunks = form.file_chunks()
        first = next(chunks, b"")  # the file part has begun: its filename is known
        path = staging / f"upload{_suffix(form.filename)}"
        with open(path, "wb") as out:
            out.write(first)
            for chunk in chunks:
                out.write(chunk)
        name = form.finish()["name"]
        info = _run_import(path, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return resolve_model(info["name"], param="name")


def jobs_using(session: Session, name: str) -> list[str]:
    """Unfinished jobs (of any kind, any project) whose base model is `name`: an evaluation's targets included."""
    rows = session.execute(select(Job.id, Job.model, Job.spec).where(Job.status.not_in(list(TERMINAL)))).all()
    found = []
    for job_id, model, spec in rows:
        targets = (spec or {}).get("targets") or []
        if model == name or any(isinstance(t, dict) and t.get("model") == name for t in targets):
            found.append(job_id)
    return sorted(found)


def delete(session: Session, name: str) -> None:
    using = jobs_using(session, name)
    if using:
        shown = ", ".join(using[:10]) + (f" and {len(using) - 10} more" if len(using) > 10 else "")
        raise Conflict(
            f"Model {name!r} is in use by unfinished jobs ({shown}); cancel them or let them finish first.",
            param="model",
            code="model_in_use",
        )
    remove(name)

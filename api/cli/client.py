"""Client commands: they talk to a Grove server over its HTTP API only, like any other client."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.cli import follow as live
from api.cli.http import ApiError, Client, resolve, write_config_file

# Each job kind's resource, and the id prefix that tells it.
JOB_PATHS = {
    "fine_tune": "/v1/fine_tuning/jobs",
    "export": "/v1/exports",
    "evaluation": "/v1/evaluations",
    "sweep": "/v1/sweeps",
}
PREFIX_KIND = {"ftjob": "fine_tune", "exjob": "export", "evaljob": "evaluation", "sweep": "sweep", "swjob": "sweep"}


class Kind(StrEnum):
    fine_tune = "fine_tune"
    export = "export"
    evaluation = "evaluation"
    sweep = "sweep"


class AdapterType(StrEnum):
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    full = "full"


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def console() -> Console:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(out.width, 160))
    return out


def client(ctx: typer.Context) -> Client:
    options = ctx.find_root().obj or {}
    return Client(resolve(options.get("base_url"), options.get("api_key")))


def handles_errors(func: Callable) -> Callable:
    """An API error becomes one line on stderr and exit status 1, not a traceback."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def eta(job: dict) -> str:
    finish = job.get("estimated_finish")
    if not finish or job.get("status") not in ("running", "queued"):
        return "-"
    return live._duration(finish - time.time())


def kind_of(job_id: str, kind: Kind | None) -> str:
    if kind is not None:
        return str(kind)
    prefix = job_id.split("-", 1)[0]
    if prefix not in PREFIX_KIND:
        raise ApiError(f"cannot tell the kind of job {job_id!r}; pass --kind")
    return PREFIX_KIND[prefix]


def job_path(job_id: str, kind: Kind | None = None) -> str:
    return f"{JOB_PATHS[kind_of(job_id, kind)]}/{job_id}"


# --- files -----------------------------------------------------------------------------------------

files = typer.Typer(help="Upload and list datasets.", no_args_is_help=True)


def validate_locally(path: Path, min_examples: int) -> dict:
    """The server's own validation (models/datasets.py), run before uploading: same line-numbered errors."""
    from models.datasets import DatasetError, validate_jsonl

    try:
        summary = validate_jsonl(path, min_examples)
    except DatasetError as exc:
        raise ApiError(f"{path}: {exc.message}", param=exc.param, code=exc.code) from None
    return {"format": summary.format, "n_examples": summary.n_examples, "fields": summary.fields}


def upload(c: Client, path: Path, purpose: str, min_examples: int, validate: bool = True) -> dict:
    if not path.is_file():
        raise ApiError(f"{path}: no such file")
    if validate:
        validate_locally(path, min_examples)
    with path.open("rb") as f:
        return c.post("/v1/files", files={"file": (path.name, f, "application/jsonl")}, data={"purpose": purpose})


@files.command("upload")
@handles_errors
def files_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A JSONL dataset.")],
    purpose: Annotated[str, typer.Option(help="File purpose.")] = "fine-tune",
    min_examples: Annotated[int, typer.Option(help="Fewest examples (the server's GROVE_MIN_EXAMPLES).")] = 10,
    validate: Annotated[bool, typer.Option(help="Validate locally before uploading.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Validate FILE locally (same line-numbered errors as the server), then upload it."""
    obj = upload(client(ctx), file, purpose, min_examples, validate)
    if as_json:
        print_json(obj)
        return
    fields = f" fields: {', '.join(obj['fields'])}" if obj.get("fields") and obj.get("format") == "fields" else ""
    typer.echo(
        f"{obj['id']}  {obj['filename']}  {obj['bytes']} bytes  {obj.get('format')}  "
        f"{obj.get('n_examples')} examples{fields}"
    )


@files.command("list")
@handles_errors
def files_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(help="How many.")] = 20, as_json: JsonOpt = False
) -> None:
    """List the project's files, newest first."""
    page = client(ctx).get("/v1/files", limit=limit)
    if as_json:
        print_json(page)
        return
    table = Table("id", "filename", "purpose", "bytes", "format", "examples", "created")
    for f in page["data"]:
        table.add_row(
            f["id"],
            f["filename"],
            f["purpose"],
            str(f["bytes"]),
            f.get("format") or "-",
            str(f.get("n_examples") or "-"),
            when(f["created_at"]),
        )
    console().print(table)


@files.command("get")
@handles_errors
def files_get(ctx: typer.Context, file_id: str, as_json: JsonOpt = False) -> None:
    """Show one file."""
    obj = client(ctx).get(f"/v1/files/{file_id}")
    print_json(obj) if as_json else _print_fields(obj)


@files.command("delete")
@handles_errors
def files_delete(ctx: typer.Context, file_id: str, as_json: JsonOpt = False) -> None:
    """Delete a file (refused while an unfinished job uses it)."""
    obj = client(ctx).delete(f"/v1/files/{file_id}")
    print_json(obj) if as_json else typer.echo(f"deleted {obj['id']}")


def _print_fields(obj: dict) -> None:
    table = Table(show_header=False, box=None)
    for key, value in obj.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console().print(table)


# --- fine-tuning ------------------------------------------------------------------------------------

finetune = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)


def _dataset(c: Client, value: str, min_examples: int, as_json: bool) -> str:
    """A file id passes through; a local path is validated and uploaded first."""
    path = Path(value)
    if value.startswith("file-") and not path.exists():
        return value
    obj = upload(c, path, "fine-tune", min_examples)
    if not as_json:
        typer.echo(f"uploaded {path} as {obj['id']} ({obj.get('n_examples')} examples, {obj.get('format')})")
    return obj["id"]


@finetune.command("create")
@handles_errors
def finetune_create(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Base model (grove models list).")],
    train: Annotated[str, typer.Option("--train", "-t", help="Training data: a local JSONL file or a file id.")],
    valid: Annotated[str | None, typer.Option("--valid", help="Validation data: a local file or a file id.")] = None,
    adapter: Annotated[AdapterType, typer.Option(help="Adapter type.")] = AdapterType.lora,
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="LoRA rank.")] = None,
    alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (n_epochs).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Tokens per example.")] = None,
    log_every: Annotated[int | None, typer.Option(help="A metrics event (a progress update) every N steps.")] = None,
    template: Annotated[str | None, typer.Option(help="text_template for files of arbitrary fields.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Suffix of the fine-tuned model's name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    export: Annotated[
        str | None, typer.Option(help="Also export to ONNX at this precision when training succeeds (e.g. int4).")
    ] = None,
    min_examples: Annotated[int, typer.Option(help="Fewest examples, for local validation.")] = 10,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job with a progress bar until it ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a fine-tuning job (uploading local data files first)."""
    c = client(ctx)
    body: dict[str, Any] = {"model": model, "training_file": _dataset(c, train, min_examples, as_json)}
    if valid:
        body["validation_file"] = _dataset(c, valid, min_examples, as_json)
    hyper = {k: v for k, v in {"n_epochs": epochs, "batch_size": batch_size}.items() if v is not None}
    if hyper:
        body["hyperparameters"] = hyper
    adapter_spec: dict[str, Any] = {"type": str(adapter)}
    if rank is not None:
        adapter_spec["r"] = rank
    if alpha is not None:
        adapter_spec["alpha"] = alpha
    body["adapter"] = adapter_spec
    optional = {
        "learning_rate": learning_rate,
        "max_steps": max_steps,
        "max_seq_len": max_seq_len,
        "text_template": template,
        "suffix": suffix,
        "log_every_steps": log_every,
        "seed": seed,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    if export:
        body["export"] = {"precision": export}
    job = c.post("/v1/fine_tuning/jobs", json=body)
    if not wait:
        print_json(job) if as_json else typer.echo(job["id"])
        return
    if not as_json:
        typer.echo(f"{job['id']}: following; Ctrl-C stops following (the job keeps running)")
    path = f"/v1/fine_tuning/jobs/{job['id']}"
    if export:
        job = _follow(c, path, as_json=False, quiet=as_json)
        if job.get("status") != "succeeded":
            _finish(c, path, as_json, events_as_json=False, job=job)
        child = _child_export(c, job["id"])
        if not as_json:
            typer.echo(f"{job['id']} succeeded; following its export {child}")
        path = f"/v1/exports/{child}"
    _finish(c, path, as_json, events_as_json=False)


def _child_export(c: Client, job_id: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        page = c.get("/v1/exports", parent_id=job_id, limit=1)
        if page["data"]:
            return page["data"][0]["id"]
        if time.monotonic() > deadline:
            raise ApiError(f"job {job_id} succeeded but no export job appeared for it")
        time.sleep(1.0)


def _follow(c: Client, path: str, as_json: bool, quiet: bool = False) -> dict:
    try:
        if quiet:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                return live.follow(c, path, as_json=as_json)
        return live.follow(c, path, as_json=as_json)
    except KeyboardInterrupt:
        typer.echo(
            f"\nStopped following; the job goes on. Resume: grove jobs events {path.rsplit('/', 1)[-1]} --follow",
            err=True,
        )
        raise typer.Exit(130) from None


def _finish(c: Client, path: str, as_json: bool, events_as_json: bool, job: dict | None = None) -> None:
    """Follow to the end, print the outcome, exit 0 / 1 (failed) / 3 (cancelled)."""
    job = job or _follow(c, path, as_json=events_as_json, quiet=as_json and not events_as_json)
    status = job.get("status")
    if as_json and not events_as_json:
        print_json(job)
    elif not as_json:
        if status == "succeeded":
            files_ = ", ".join(job.get("result_files") or []) or "none"
            typer.echo(f"{job['id']} succeeded. Result files: {files_}. Download: grove download {job['id']}")
        elif status == "failed":
            error = job.get("error") or {}
            param = f" (param: {error['param']})" if error.get("param") else ""
            typer.echo(f"{job['id']} failed: {error.get('message', 'unknown error')}{param}", err=True)
        else:
            typer.echo(f"{job['id']} {status}.", err=True)
    raise typer.Exit(live.EXIT_CODES.get(status, 1))


# --- jobs -------------------------------------------------------------------------------------------

jobs = typer.Typer(help="Jobs of every kind: list, get, cancel, events.", no_args_is_help=True)
KindOpt = Annotated[Kind | None, typer.Option(help="Job kind; told from the id when left out.")]


@jobs.command("list")
@handles_errors
def jobs_list(
    ctx: typer.Context,
    kind: Annotated[Kind, typer.Option(help="Job kind.")] = Kind.fine_tune,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first, with status, progress and ETA."""
    page = client(ctx).get(JOB_PATHS[str(kind)], limit=limit)
    if as_json:
        print_json(page)
        return
    table = Table("id", "status", "model", "progress", "ETA", "created")
    for job in page["data"]:
        progress = job.get("progress") or {}
        pct = progress.get("percent")
        steps = f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}"
        table.add_row(
            job["id"],
            job["status"],
            str(job.get("model", "-")),
            f"{steps} ({pct:.0f}%)" if pct is not None else steps,
            eta(job),
            when(job["created_at"]),
        )
    console().print(table)


@jobs.command("get")
@handles_errors
def jobs_get(ctx: typer.Context, job_id: str, kind: KindOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job."""
    job = client(ctx).get(job_path(job_id, kind))
    print_json(job) if as_json else _print_fields(job)


@jobs.command("cancel")
@handles_errors
def jobs_cancel(ctx: typer.Context, job_id: str, kind: KindOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a job: at once when queued, between two steps when running."""
    job = client(ctx).post(f"{job_path(job_id, kind)}/cancel")
    print_json(job) if as_json else typer.echo(f"{job['id']} {job['status']}")


@jobs.command("events")
@handles_errors
def jobs_events(
    ctx: typer.Context,
    job_id: str,
    kind: KindOpt = None,
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream live with a progress bar until the end.")
    ] = False,
    limit: Annotated[int, typer.Option(help="How many (without --follow).")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """A job's events, oldest first; --follow streams them (JSON lines with --json) until the job ends."""
    c = client(ctx)
    path = job_path(job_id, kind)
    if follow_:
        _finish(c, path, as_json, events_as_json=as_json)
    page = c.get(f"{path}/events", limit=limit)
    if as_json:
        print_json(page)
        return
    for event in reversed(page["data"]):
        typer.echo(f"{when(event['created_at'])}  {event.get('event_type', event['type']):<10} {event['message']}")


# --- download ---------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(c: Client, file_id: str, output: Path | None, quiet: bool) -> Path:
    """Download to OUTPUT via OUTPUT.part, resuming a partial download with Range; verify the sha256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    meta = c.get(f"/v1/files/{file_id}")
    target = output if output is not None else Path(meta["filename"])
    if target.is_dir():
        target = target / meta["filename"]
    expected = meta["sha256"]
    if target.is_file() and _sha256(target) == expected:
        if not quiet:
            typer.echo(f"{target} is already complete (sha256 {expected[:12]}...)")
        return target
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if offset > meta["bytes"]:
        part.unlink()
        offset = 0
    headers = {"range": f"bytes={offset}-", "if-range": f'"{expected}"'} if offset else {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (
        c.http.stream("GET", f"/v1/files/{file_id}/content", headers=headers) as response,
        Progress(*columns, console=Console(stderr=True), disable=quiet) as bar,
    ):
        if response.status_code == 416:  # the part file already holds every byte
            response.read()
        else:
            if not response.is_success:
                response.read()
                c.raise_for(response)
            resumed = response.status_code == 206
            mode = "ab" if resumed else "wb"
            start = offset if resumed else 0
            task = bar.add_task(f"{target.name}{' (resumed)' if resumed else ''}", total=meta["bytes"], completed=start)
            target.parent.mkdir(parents=True, exist_ok=True)
            with part.open(mode) as out:
                for chunk in response.iter_bytes(1 << 16):
                    out.write(chunk)
                    bar.advance(task, len(chunk))
    actual = _sha256(part)
    if actual != expected:
        part.unlink()
        raise ApiError(
            f"{target}: sha256 mismatch (got {actual}, expected {expected}); the partial file was removed, "
            "run the command again"
        )
    os.replace(part, target)
    if not quiet:
        typer.echo(f"{target}  {meta['bytes']} bytes  sha256 {expected} verified")
    return target


def download(
    ctx: typer.Context,
    object_id: Annotated[str, typer.Argument(metavar="JOB_OR_FILE_ID", help="A file id, or a job id for its results.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File path, or a directory.")] = None,
    all_files: Annotated[bool, typer.Option("--all", help="For a job: every result file, not only the first.")] = False,
    kind: KindOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a file, or a job's result (the adapter, the export archive); resumes and verifies sha256."""
    try:
        c = client(ctx)
        if object_id.startswith("file-"):
            ids = [object_id]
        else:
            job = c.get(job_path(object_id, kind))
            ids = list(job.get("result_files") or [])
            if not ids:
                raise ApiError(f"job {object_id} has no result files (status: {job.get('status')})")
            ids = ids if all_files else ids[:1]
        if len(ids) > 1 and output is not None and not output.is_dir():
            output.mkdir(parents=True, exist_ok=True)
        paths = [download_file(c, file_id, output, quiet=as_json) for file_id in ids]
    except ApiError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        print_json([{"file_id": i, "path": str(p)} for i, p in zip(ids, paths, strict=True)])


# --- models, configure ------------------------------------------------------------------------------

models = typer.Typer(help="Base models the workers can fine-tune.", no_args_is_help=True)


@models.command("list")
@handles_errors
def models_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the base models in the server's model store."""
    page = client(ctx).get("/v1/models")
    if as_json:
        print_json(page)
        return
    table = Table("id", "context length", "max LoRA rank", "parameters")
    for m in page["data"]:
        params = m.get("parameters")
        table.add_row(
            m["id"],
            str(m.get("context_length", "-")),
            str(m.get("max_lora_rank", "-")),
            f"{params / 1e6:.1f}M" if params else "-",
        )
    console().print(table)


def configure(
    base_url: Annotated[str | None, typer.Option(help="Server URL, e.g. http://grove.internal:8000.")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (kept in the file with mode 600).")] = None,
    show: Annotated[
        bool, typer.Option("--show", help="Print the settings in effect and where each comes from.")
    ] = False,
) -> None:
    """Save the server URL and API key in the config file that client commands read."""
    if base_url or api_key:
        path = write_config_file({"base_url": base_url or "", "api_key": api_key or ""})
        typer.echo(f"saved {path}")
    if show or not (base_url or api_key):
        settings = resolve()
        key = f"{settings.api_key[:10]}..." if settings.api_key else "(none)"
        typer.echo(f"base_url  {settings.base_url}  ({settings.source['base_url']})")
        typer.echo(f"api_key   {key}  ({settings.source['api_key']})")

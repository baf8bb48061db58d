"""`grove finetune create`: a fine-tuning job from local data files or file ids, optionally followed to its end."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from api.cli.common import JOB_PATHS, JsonOpt, client, handles_errors, print_json
from api.cli.files import upload
from api.cli.http import ApiError, Client
from api.cli.job_commands import finish, follow_job
from models.job_kind import JobKind

finetune = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)


class AdapterType(StrEnum):
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    full = "full"


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
    job = c.post(JOB_PATHS[JobKind.fine_tune], json=body)
    if not wait:
        print_json(job) if as_json else typer.echo(job["id"])
        return
    if not as_json:
        typer.echo(f"{job['id']}: following; Ctrl-C stops following (the job keeps running)")
    path = f"{JOB_PATHS[JobKind.fine_tune]}/{job['id']}"
    if export:
        job = follow_job(c, path, as_json=False, quiet=as_json)
        if job.get("status") != "succeeded":
            finish(c, path, as_json, events_as_json=False, job=job)
        child = _child_export(c, job["id"])
        if not as_json:
            typer.echo(f"{job['id']} succeeded; following its export {child}")
        path = f"{JOB_PATHS[JobKind.export]}/{child}"
    finish(c, path, as_json, events_as_json=False)


def _child_export(c: Client, job_id: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        page = c.get(JOB_PATHS[JobKind.export], parent_id=job_id, limit=1)
        if page["data"]:
            return page["data"][0]["id"]
        if time.monotonic() > deadline:
            raise ApiError(f"job {job_id} succeeded but no export job appeared for it")
        time.sleep(1.0)

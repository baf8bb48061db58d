"""What every client command group shares: the connection from the root options, error handling, output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.cli import follow as live
from api.cli.http import ApiError, Client, resolve
from models.job_kind import JobKind

JOB_PATHS = {
    JobKind.fine_tune: "/v1/fine_tuning/jobs",
    JobKind.export: "/v1/exports",
    JobKind.evaluation: "/v1/evaluations",
    JobKind.sweep: "/v1/sweeps",
}
PREFIX_KIND = {kind.id_prefix: kind for kind in JobKind} | {"swjob": JobKind.sweep}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
KindOpt = Annotated[JobKind | None, typer.Option(help="Job kind; told from the id when left out.")]


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


def print_fields(obj: dict) -> None:
    table = Table(show_header=False, box=None)
    for key, value in obj.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console().print(table)


def when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def eta(job: dict) -> str:
    finish = job.get("estimated_finish")
    if not finish or job.get("status") not in ("running", "queued"):
        return "-"
    return live.duration(finish - time.time())


def kind_of(job_id: str, kind: JobKind | None) -> JobKind:
    if kind is not None:
        return kind
    prefix = job_id.split("-", 1)[0]
    if prefix not in PREFIX_KIND:
        raise ApiError(f"cannot tell the kind of job {job_id!r}; pass --kind")
    return PREFIX_KIND[prefix]


def job_path(job_id: str, kind: JobKind | None = None) -> str:
    return f"{JOB_PATHS[kind_of(job_id, kind)]}/{job_id}"

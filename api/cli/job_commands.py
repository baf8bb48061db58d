"""`grove jobs`: jobs of every kind (list, get, cancel, events), and following one to its end."""

from __future__ import annotations

import contextlib
import os
from typing import Annotated

import typer
from rich.table import Table

from api.cli import follow as live
from api.cli.common import (
    JOB_PATHS,
    JsonOpt,
    KindOpt,
    client,
    console,
    eta,
    handles_errors,
    job_path,
    print_fields,
    print_json,
    when,
)
from api.cli.http import Client
from models.job_kind import JobKind

jobs = typer.Typer(help="Jobs of every kind: list, get, cancel, pause, resume, events.", no_args_is_help=True)


def follow_job(c: Client, path: str, as_json: bool, quiet: bool = False) -> dict:
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


def finish(c: Client, path: str, as_json: bool, events_as_json: bool, job: dict | None = None) -> None:
    """Follow to the end (or a pause), print the outcome, exit 0 / 1 (failed) / 3 (cancelled) / 4 (paused)."""
    job = job or follow_job(c, path, as_json=events_as_json, quiet=as_json and not events_as_json)
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
        elif status == "paused":
            typer.echo(f"{job['id']} paused; stopped following. Continue it: grove jobs resume {job['id']}", err=True)
        else:
            typer.echo(f"{job['id']} {status}.", err=True)
    raise typer.Exit(live.EXIT_CODES.get(status, 1))


@jobs.command("list")
@handles_errors
def jobs_list(
    ctx: typer.Context,
    kind: Annotated[JobKind, typer.Option(help="Job kind.")] = JobKind.fine_tune,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first, with status, progress and ETA."""
    page = client(ctx).get(JOB_PATHS[kind], limit=limit)
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
            job.get("status_detail") or job["status"],
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
    print_json(job) if as_json else print_fields(job)


@jobs.command("cancel")
@handles_errors
def jobs_cancel(ctx: typer.Context, job_id: str, kind: KindOpt = None, as_json: JsonOpt = False) -> None:
    """Cancel a job: at once when queued, between two steps when running."""
    job = client(ctx).post(f"{job_path(job_id, kind)}/cancel")
    print_json(job) if as_json else typer.echo(f"{job['id']} {job['status']}")


@jobs.command("pause")
@handles_errors
def jobs_pause(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Pause a fine-tuning job: at once when queued; when running, after its current step, freeing its worker."""
    job = client(ctx).post(f"{job_path(job_id, JobKind.fine_tune)}/pause")
    print_json(job) if as_json else typer.echo(f"{job['id']} {job['status']}")


@jobs.command("resume")
@handles_errors
def jobs_resume(ctx: typer.Context, job_id: str, as_json: JsonOpt = False) -> None:
    """Resume a paused fine-tuning job from where it paused."""
    job = client(ctx).post(f"{job_path(job_id, JobKind.fine_tune)}/resume")
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
        finish(c, path, as_json, events_as_json=as_json)
    page = c.get(f"{path}/events", limit=limit)
    if as_json:
        print_json(page)
        return
    for event in reversed(page["data"]):
        typer.echo(f"{when(event['created_at'])}  {event.get('event_type', event['type']):<10} {event['message']}")

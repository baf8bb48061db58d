"""`grove download`: a file, or a job's result files; resumes a partial download and verifies the sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from api.cli.common import JsonOpt, KindOpt, client, handles_errors, job_path, print_json
from api.cli.http import ApiError, Client


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


@handles_errors
def download(
    ctx: typer.Context,
    object_id: Annotated[str, typer.Argument(metavar="JOB_OR_FILE_ID", help="A file id, or a job id for its results.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File path, or a directory.")] = None,
    all_files: Annotated[bool, typer.Option("--all", help="For a job: every result file, not only the first.")] = False,
    kind: KindOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a file, or a job's result (the adapter, the export archive); resumes and verifies sha256."""
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
    if as_json:
        print_json([{"file_id": i, "path": str(p)} for i, p in zip(ids, paths, strict=True)])

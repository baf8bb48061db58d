"""`grove files`: upload (validated locally first), list, get and delete datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from api.cli.common import JsonOpt, client, console, handles_errors, print_fields, print_json, when
from api.cli.http import ApiError, Client

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
    print_json(obj) if as_json else print_fields(obj)


@files.command("delete")
@handles_errors
def files_delete(ctx: typer.Context, file_id: str, as_json: JsonOpt = False) -> None:
    """Delete a file (refused while an unfinished job uses it)."""
    obj = client(ctx).delete(f"/v1/files/{file_id}")
    print_json(obj) if as_json else typer.echo(f"deleted {obj['id']}")

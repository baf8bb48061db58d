"""`grove models list` (the base models the server can fine-tune), `grove models import` (operator: adds one to the
local model store) and `grove configure` (which server, which key)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from api.cli.common import JsonOpt, client, console, handles_errors, print_json
from api.cli.http import resolve, write_config_file

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


@models.command("import")
def models_import(
    source: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face model directory, a .gguf file or a .tar/.tar.gz archive inside GROVE_MODEL_IMPORT_DIR "
            "(var/import), or a Hugging Face repository id (owner/name; only where the hub is reachable)."
        ),
    ],
    name: Annotated[str, typer.Option(help="The new model's id (a-z, 0-9, '.', '_', '-').")],
    description: Annotated[str, typer.Option(help="Shown in `grove models list --json`.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Import a base model into this machine's model store (operator: no server involved). It is checked
    (safetensors only, a supported architecture, a tokenizer, no shipped code unless allowlisted) and appears
    whole or not at all."""
    from models.errors import GroveError
    from worker.model_import import import_model

    try:
        info = import_model(source, name, description)
    except GroveError as exc:
        typer.echo(f"Error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        print_json(info)
        return
    typer.echo(
        f"imported {info['name']}: {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, "
        f"context {info['context_length']}, max LoRA rank {info['max_lora_rank']}"
    )


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

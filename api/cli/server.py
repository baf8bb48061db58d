"""`grove models list` (the base models the server can fine-tune) and `grove configure` (which server, which key)."""

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

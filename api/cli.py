"""`grove`: operator commands that talk to the database directly (projects, keys, reconciler)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from api.services.keys import create_key, get_or_create_project, is_active
from models.db import session_scope

app = typer.Typer(help="Grove operator commands.", no_args_is_help=True)
keys = typer.Typer(help="Projects and API keys.", no_args_is_help=True)
app.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(project: Annotated[str, typer.Option(help="Project name; created if new.")]) -> None:
    """Create an API key for PROJECT and print it. The key is shown only this once."""
    with session_scope() as session:
        key = create_key(session, get_or_create_project(session, project))
    typer.echo(key)


@app.command()
def bootstrap(
    key_file: Annotated[Path, typer.Option(help="Where the bootstrap key is kept.")] = Path("var/api-key"),
    project: Annotated[str, typer.Option(help="Project of the bootstrap key.")] = "default",
) -> None:
    """Create the first project and key once, store the key in KEY_FILE (mode 600), print it."""
    with session_scope() as session:
        kept = key_file.read_text().strip() if key_file.exists() else ""
        if kept and is_active(session, kept):
            typer.echo(kept)
            return
        # No key yet, or one from a database that has since been reset: make a fresh one.
        key = create_key(session, get_or_create_project(session, project))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.chmod(0o600)
    key_file.write_text(key + "\n")
    typer.echo(key)


@app.command()
def reconcile(
    loop: Annotated[bool, typer.Option(help="Keep running every reconcile interval.")] = False,
) -> None:
    """Re-send lost job messages and requeue jobs whose worker died."""
    from models.config import get_settings
    from worker.reconcile import reconcile_once

    while True:
        typer.echo(reconcile_once())
        if not loop:
            return
        time.sleep(get_settings().reconcile_interval_seconds)


if __name__ == "__main__":
    app()

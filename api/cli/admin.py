"""Operator commands that talk to the database directly: projects and keys, bootstrap, the reconciler."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

keys = typer.Typer(help="Projects and API keys (operator: talks to the database directly).", no_args_is_help=True)


@keys.command("create")
def keys_create(project: Annotated[str, typer.Option(help="Project name; created if new.")]) -> None:
    """Create an API key for PROJECT and print it. The key is shown only this once."""
    from api.services.keys import create_key, get_or_create_project
    from models.db import session_scope

    with session_scope() as session:
        key = create_key(session, get_or_create_project(session, project))
    typer.echo(key)


def bootstrap(
    key_file: Annotated[Path, typer.Option(help="Where the bootstrap key is kept.")] = Path("var/api-key"),
    project: Annotated[str, typer.Option(help="Project of the bootstrap key.")] = "default",
) -> None:
    """Create the first project and key once, store the key in KEY_FILE (mode 600), print it. (Operator.)"""
    from api.services.keys import create_key, get_or_create_project
    from models.db import session_scope

    if key_file.exists() and key_file.read_text().strip():
        typer.echo(key_file.read_text().strip())
        return
    with session_scope() as session:
        key = create_key(session, get_or_create_project(session, project))
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    typer.echo(key)


def reconcile(
    loop: Annotated[bool, typer.Option(help="Keep running every reconcile interval.")] = False,
) -> None:
    """Re-send lost job messages and requeue jobs whose worker died. (Operator.)"""
    from models.config import get_settings
    from worker.reconcile import reconcile_once

    while True:
        typer.echo(reconcile_once())
        if not loop:
            return
        time.sleep(get_settings().reconcile_interval_seconds)

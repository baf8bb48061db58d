"""Operator commands that talk to the database directly: projects and keys, bootstrap, the reconciler."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

keys = typer.Typer(help="Projects and API keys (operator: talks to the database directly).", no_args_is_help=True)


@keys.command("create")
def keys_create(
    project: Annotated[str | None, typer.Option(help="Project name; created if new.")] = None,
    admin: Annotated[
        bool, typer.Option("--admin", help="An admin key: manages keys over HTTP (/v1/admin/keys), nothing else.")
    ] = False,
) -> None:
    """Create an API key for PROJECT (or, with --admin, an admin key) and print it. The key is shown only this once."""
    from api.services.keys import create_admin_key, create_key, get_or_create_project
    from models.db import session_scope

    if admin == (project is not None):
        raise typer.BadParameter("give --project NAME for a project key, or --admin for an admin key")
    with session_scope() as session:
        key = create_admin_key(session) if admin else create_key(session, get_or_create_project(session, project))
    typer.echo(key)


@keys.command("list")
def keys_list(project: Annotated[str | None, typer.Option(help="Only this project's keys.")] = None) -> None:
    """List keys: id, scope, project, hint, revoked or not. Keys themselves are never stored."""
    from api.services.keys import list_keys
    from models.db import session_scope

    with session_scope() as session:
        after = None
        while True:
            rows, has_more = list_keys(session, after, 1000, project)
            for key, owner in rows:
                state = "revoked" if key.revoked_at else "active"
                typer.echo(f"{key.id}\t{key.scope}\t{owner.name if owner else '-'}\t{key.hint}...\t{state}")
            if not has_more:
                return
            after = rows[-1][0].id


@keys.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (key-...) that `keys list` shows.")]) -> None:
    """Revoke a key: every later request with it gets 401."""
    from api.services.keys import revoke
    from models.db import session_scope
    from models.errors import NotFound

    try:
        with session_scope() as session:
            revoke(session, key_id)
    except NotFound as exc:
        raise typer.BadParameter(exc.message) from None
    typer.echo(f"revoked {key_id}")


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

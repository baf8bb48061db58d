"""Operator commands that talk to the database directly: projects and keys, bootstrap, the reconciler."""

from __future__ import annotations

import string
import time
from pathlib import Path
from typing import Annotated

import typer

URL_SAFE = set(string.ascii_letters + string.digits + "-_")
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
    """Create the first project and key once, store the key in KEY_FILE (mode 600), print it. (Operator.)

    A key already in KEY_FILE is printed if the database knows it. One it does not know (the database was
    made anew, by `make clean` say) is registered for PROJECT; one it knows as revoked, or that is no key
    this service made, is replaced by a new key. Either is said on stderr: stdout is the key alone."""
    from sqlalchemy import select

    from api.services.keys import create_key, get_or_create_project
    from models.db import session_scope
    from models.project import ApiKey, hash_key

    kept = key_file.read_text().strip() if key_file.exists() else ""
    note = None
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(kept))) if kept else None
        if row is not None and row.revoked_at is None:
            key = kept
        elif kept and row is None and _made_here(kept):
            owner = get_or_create_project(session, project)
            session.add(ApiKey(project_id=owner.id, key_hash=hash_key(kept), hint=kept[:10]))
            key, note = kept, f"this database did not know the key there; registered it for project {project!r}"
        else:
            key = create_key(session, get_or_create_project(session, project))
            if kept:
                why = "was revoked" if row is not None else "is not a key this service made"
                note = f"the key there {why}; wrote a new key for project {project!r}"
    if key != kept:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.chmod(0o600)
        key_file.write_text(key + "\n")
    if note:
        typer.echo(f"{key_file}: {note}.", err=True)
    typer.echo(key)


def _made_here(key: str) -> bool:
    """Shaped as `generate_key` makes keys: the prefix and 32 random bytes (43 URL-safe characters)."""
    from models.project import KEY_PREFIX

    body = key.removeprefix(KEY_PREFIX)
    return key.startswith(KEY_PREFIX) and len(body) == 43 and set(body) <= URL_SAFE


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

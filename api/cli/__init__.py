"""`grove`: the command-line client of the HTTP API, plus the operator commands.

Client commands (files, finetune, jobs, download, models, configure) talk to a server over HTTP only;
see api/cli/http.py for where the URL and key come from. Each command group has its module (files.py,
finetune.py, job_commands.py, download.py, server.py), on the shared helpers of common.py. Operator
commands (keys create/list/revoke, bootstrap, reconcile) talk to the database directly, and `models import` to the
model store, and run where the server's configuration is.
"""

from __future__ import annotations

from typing import Annotated

import typer

from api.cli import admin, download, files, finetune, job_commands, server

app = typer.Typer(
    help="Grove: fine-tune small language models on your own machines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    base_url: Annotated[
        str | None, typer.Option(help="Server URL (default: GROVE_BASE_URL, the config file, http://127.0.0.1:8000).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: GROVE_API_KEY, the config file, ./var/api-key).")
    ] = None,
) -> None:
    ctx.obj = {"base_url": base_url, "api_key": api_key}


app.add_typer(files.files, name="files")
app.add_typer(finetune.finetune, name="finetune")
app.add_typer(job_commands.jobs, name="jobs")
app.add_typer(server.models, name="models")
app.command("download")(download.download)
app.command("configure")(server.configure)
app.add_typer(admin.keys, name="keys")
app.command("bootstrap")(admin.bootstrap)
app.command("reconcile")(admin.reconcile)

__all__ = ["app"]

if __name__ == "__main__":
    app()

"""Issue 16, `grove bootstrap`: the key it prints works.

Before, a key already in var/api-key was printed as it was, so after `make clean` (which deletes the database
and keeps var/api-key) `make run` printed a key that answered 401. Now the key is checked against the
database: an unknown one that this service made is registered (only its hash is stored); a revoked one, or
anything else, is replaced by a new key. Either is said on stderr; stdout stays the key alone, which
scripts/run-embedded reads.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from api.cli import app as cli
from models.project import generate_key, hash_key
from tests.conftest import REPO, alembic

runner = CliRunner()


def _revoked() -> str:
    from api.services.keys import get_or_create_project, issue, revoke
    from models.db import session_scope

    with session_scope() as session:
        row, key = issue(session, get_or_create_project(session, "boot-revoked"))
        revoke(session, row.id)
    return key


def _known() -> str:
    from tests.conftest import new_key

    return new_key()


# What var/api-key holds; whether bootstrap prints that same key; what it says on stderr.
ROWS = [
    pytest.param(None, False, "", id="no-file"),
    pytest.param("", False, "", id="empty-file"),
    pytest.param(_known, True, "", id="a-key-the-database-knows"),
    pytest.param(generate_key, True, "did not know the key there; registered it", id="unknown-key"),
    pytest.param(_revoked, False, "the key there was revoked; wrote a new key", id="revoked-key"),
    pytest.param(lambda: "hunter2", False, "is not a key this service made; wrote a new key", id="not-a-key"),
    pytest.param(lambda: "grove-" + "x" * 42 + "!", False, "is not a key this service made", id="odd-key"),
]


@pytest.mark.parametrize(("kept", "same", "said"), ROWS)
def test_bootstrap_prints_a_key_that_works(client, tmp_path, kept, same, said):
    key_file = tmp_path / "var" / "api-key"
    before = None
    if kept is not None:
        before = kept if isinstance(kept, str) else kept()
        key_file.parent.mkdir()
        key_file.touch(mode=0o600)  # as an earlier bootstrap left it
        key_file.write_text(before + "\n")
    result = runner.invoke(cli, ["bootstrap", "--key-file", str(key_file), "--project", f"boot-{uuid.uuid4().hex[:6]}"])
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert (key == before) is same and key.startswith("grove-")
    assert said in result.stderr and (said or result.stderr == "")
    assert key_file.read_text() == key + "\n" and (key_file.stat().st_mode & 0o777) == 0o600
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    # Run again, it has nothing left to say.
    again = runner.invoke(cli, ["bootstrap", "--key-file", str(key_file)])
    assert again.stdout.strip() == key and again.stderr == ""


def _bootstrap(database: Path, key_file: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"GROVE_DATABASE_URL": f"sqlite:///{database}"}
    grove = Path(sys.executable).parent / "grove"
    return subprocess.run(
        [str(grove), "bootstrap", "--key-file", str(key_file)], cwd=REPO, env=env, capture_output=True, text=True
    )


def _active(database: Path, key: str) -> int:
    with sqlite3.connect(database) as connection:
        query = "SELECT count(*) FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL"
        return connection.execute(query, (hash_key(key),)).fetchone()[0]


def test_make_clean_then_make_run_keeps_the_key_working(tmp_path):
    """What `make run` does (scripts/run-embedded), on a new SQLite database, before and after `make clean`."""
    database, key_file = tmp_path / "grove.db", tmp_path / "api-key"
    alembic("upgrade", "head", url=f"sqlite:///{database}")
    first = _bootstrap(database, key_file)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    key = first.stdout.strip()
    assert _active(database, key) == 1

    database.unlink()  # make clean: rm -rf var/grove.db*; var/api-key stays
    alembic("upgrade", "head", url=f"sqlite:///{database}")
    assert _active(database, key) == 0
    second = _bootstrap(database, key_file)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == key and "registered it for project 'default'" in second.stderr
    assert _active(database, key) == 1

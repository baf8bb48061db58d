"""Settings resolve relative paths once, against the directory the process starts in (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import Settings, absolute_sqlite_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///var/grove.db", "sqlite:///{cwd}/var/grove.db"),
        ("sqla+sqlite:///var/broker.sqlite", "sqla+sqlite:///{cwd}/var/broker.sqlite"),
        ("sqlite+pysqlite:///g.db?timeout=5", "sqlite+pysqlite:///{cwd}/g.db?timeout=5"),
        ("sqlite:////srv/grove.db", "sqlite:////srv/grove.db"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("sqlite://", "sqlite://"),
        ("postgresql+psycopg://grove:s3cret@db/grove", "postgresql+psycopg://grove:s3cret@db/grove"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_a_relative_sqlite_file_is_made_absolute_and_nothing_else_changes(url, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_sqlite_url(url) == expected.format(cwd=tmp_path.resolve())


def test_the_embedded_defaults_resolve_against_the_starting_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("DATABASE_URL", "BROKER_URL", "STORAGE_DIR", "WORK_DIR", "MODEL_STORE_DIR"):
        monkeypatch.delenv(f"GROVE_{name}", raising=False)
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    root = tmp_path.resolve()
    assert settings.storage_dir == root / "var" / "storage" and settings.work_dir == root / "var" / "work"
    assert settings.model_store_dir == root / "var" / "models"
    assert settings.database_url == f"sqlite:///{root}/var/grove.db"
    assert settings.broker_url == f"sqla+sqlite:///{root}/var/broker.sqlite"
    monkeypatch.setenv("GROVE_STORAGE_DIR", "~/store")
    assert Settings(_env_file=None).storage_dir == Path("~/store").expanduser().resolve()

"""With its database unreachable the API answers 503 with the error envelope, never a bare 500."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, free_port


def test_database_down_gives_503(tmp_path):
    port = free_port()
    env = {
        "GROVE_DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/nothing-listens-here",
        "GROVE_STORAGE_DIR": str(tmp_path / "storage"),
        "GROVE_RUN_RECONCILER": "false",
        "PATH": str(Path(sys.executable).parent),
    }
    api = subprocess.Popen(
        [str(Path(sys.executable).parent / "uvicorn"), "api.main:app", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")
        response = httpx.get(f"{base}/v1/files", headers={"Authorization": "Bearer grove-x"}, timeout=10)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "service_unavailable"
    finally:
        api.terminate()
        api.wait(timeout=10)


def test_a_read_whose_connection_the_database_dropped_is_answered(client, auth):
    """A status poll on a pooled connection that a database restart killed gets its answer, not a 503: the
    read pool has no ping on checkout (models/db.py), so the read runs again on a new connection."""
    from sqlalchemy import text

    from models.db import get_engine

    assert client.get("/v1/files", headers=auth).status_code == 200  # leaves a connection in the read pool
    with get_engine().connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'grove-api-read' AND datname = current_database()"
            )
        ).scalar()
    assert killed >= 1

    response = client.get("/v1/files", headers=auth)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "list"


def test_a_read_cannot_write(client, auth):
    """Reads run in read-only transactions: a read route that wrote by mistake would fail, not commit."""
    from sqlalchemy import text
    from sqlalchemy.exc import InternalError

    from models.db import get_read_sessionmaker

    with get_read_sessionmaker()() as session, pytest.raises(InternalError, match="read-only transaction"):
        session.execute(text("CREATE TABLE read_pool_wrote_this (id int)"))

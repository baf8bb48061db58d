"""With its database unreachable the API answers 503 with the error envelope, never a bare 500."""

import subprocess
import sys
import time
from pathlib import Path

import httpx

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

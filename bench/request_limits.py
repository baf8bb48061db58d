"""Cost of the per-key rate limit on the status-polling path, for docs/RELIABILITY.md (Security).

Usage: make bench-limits   (needs local PostgreSQL and Redis)

One API process (uvicorn, PostgreSQL, Redis) per configuration, each polled by one client over one connection:
GET /v1/fine_tuning/jobs/{id}, 3,000 requests after 300 of warm-up; median and p99 latency. Configurations, in
the same run and in turn (twice, to even out other load on the machine): no rate limit (GROVE_RATE_LIMIT=off), a
moving window and a fixed window in Redis, both set too high to refuse anything. The limit is on by default
(1200/minute per key), which this client would pass in seconds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import BIN, ENV, NAME, QUEUE, REPO, TMP, admin, fine_tune_body, free_port, wait_healthy  # noqa: E402

CONFIGS = {
    "no rate limit": {"GROVE_RATE_LIMIT": "off"},
    "moving window, Redis": {"GROVE_RATE_LIMIT": "1000000/second", "GROVE_RATE_LIMIT_STRATEGY": "moving-window"},
    "fixed window, Redis": {"GROVE_RATE_LIMIT": "1000000/second", "GROVE_RATE_LIMIT_STRATEGY": "fixed-window"},
}


def poll(base: str, path: str, auth: dict, n: int = 3000) -> list[float]:
    with httpx.Client(base_url=base, headers=auth) as client:
        for _ in range(300):
            client.get(path).raise_for_status()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.get(path).raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    admin(f'CREATE DATABASE "{NAME}"')
    try:
        subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=ENV, check=True, capture_output=True)
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            key = create_key(session, get_or_create_project(session, f"limits-{uuid.uuid4().hex[:6]}"))
        auth = {"Authorization": f"Bearer {key}"}
        job_path = None
        results: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(2):
            for name, extra in CONFIGS.items():
                port = free_port()
                api = subprocess.Popen(
                    [str(BIN / "uvicorn"), "api.main:app", "--port", str(port), "--log-level", "warning"],
                    cwd=REPO,
                    env=ENV | {"GROVE_LOG_LEVEL": "WARNING"} | extra,
                )
                base = f"http://127.0.0.1:{port}"
                try:
                    wait_healthy(base)
                    if job_path is None:
                        job = fine_tune_body(base, auth)
                        created = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=auth, json=job).json()
                        job_path = f"/v1/fine_tuning/jobs/{created['id']}"
                    results[name] += poll(base, job_path, auth)
                finally:
                    api.terminate()
                    api.wait(timeout=30)
        for name, times in results.items():
            times.sort()
            print(
                f"{name}: median {statistics.median(times):.2f} ms, p99 {times[int(len(times) * 0.99)]:.2f} ms "
                f"({len(times)} requests)"
            )
    finally:
        admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        import shutil

        import redis

        redis.Redis().delete(QUEUE)
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    os.chdir(REPO)
    main()

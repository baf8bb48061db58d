"""Listing cost with 100 jobs against 100,000 jobs in the table: keyset pagination must not care.

Usage: make bench-pagination   (needs the local PostgreSQL; builds and drops its own database)
Prints the median and p99 latency of `GET /v1/fine_tuning/jobs?limit=20` (first page and a deep
page through `after`) for both table sizes, their ratio, and PostgreSQL's plan for the query.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import uuid

ADMIN = os.environ.get("GROVE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NAME = f"grove_bench_{uuid.uuid4().hex[:8]}"
URL = ADMIN.rsplit("/", 1)[0] + f"/{NAME}"
os.environ |= {"GROVE_DATABASE_URL": URL, "GROVE_RUN_RECONCILER": "false", "GROVE_BROKER_URL": "memory://"}

from sqlalchemy import create_engine, insert, text  # noqa: E402


def admin(sql: str) -> None:
    engine = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(sql))
    engine.dispose()


def fill(project_id: str, count: int) -> None:
    from models.ids import new_id
    from models.job import Job

    engine = create_engine(URL)
    rows = [
        {
            "id": new_id("ftjob"),
            "project_id": project_id,
            "kind": "fine_tune",
            "queue": "q",
            "model": "m",
            "spec": {"seed": 1, "adapter": {}, "max_seq_len": 512},
            "hyperparameters": {},
            "status": "succeeded",
            "attempts": 1,
            "step": 0,
            "result_files": [],
        }
        for _ in range(count)
    ]
    with engine.begin() as connection:
        for start in range(0, len(rows), 10_000):
            connection.execute(insert(Job), rows[start : start + 10_000])
        connection.execute(text("ANALYZE jobs"))
    engine.dispose()


def measure(client, headers, path: str, n: int = 200) -> tuple[float, float]:
    timings = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(path, headers=headers)
        timings.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.text
    timings.sort()
    return statistics.median(timings), timings[int(len(timings) * 0.99) - 1]


def main() -> None:
    admin(f'CREATE DATABASE "{NAME}"')
    try:
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], check=True, capture_output=True)
        from fastapi.testclient import TestClient

        from api.app import create_app
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        results = {}
        keys = {}
        with TestClient(create_app()) as client:
            for size in (100, 100_000):
                with session_scope() as session:
                    project = get_or_create_project(session, f"bench-{size}")
                    key = create_key(session, project)
                    project_id = project.id
                fill(project_id, size)
                headers = {"Authorization": f"Bearer {key}"}
                keys[size] = (headers, project_id)
                first = client.get("/v1/fine_tuning/jobs?limit=20", headers=headers).json()
                # A cursor half-way down the project's jobs (found directly: the API has no offsets).
                engine = create_engine(URL)
                with engine.connect() as connection:
                    cursor = connection.execute(
                        text("SELECT id FROM jobs WHERE project_id = :p ORDER BY id DESC OFFSET :n LIMIT 1"),
                        {"p": project_id, "n": size // 2},
                    ).scalar_one()
                engine.dispose()
                results[size] = {
                    "first": measure(client, headers, "/v1/fine_tuning/jobs?limit=20"),
                    "deep": measure(client, headers, f"/v1/fine_tuning/jobs?limit=20&after={cursor}"),
                }
                assert first["has_more"] is True
            # The small tenant again, now that another tenant holds 100,000 jobs in the same table.
            headers, small_project = keys[100]
            results["small_in_large"] = {"first": measure(client, headers, "/v1/fine_tuning/jobs?limit=20")}
        engine = create_engine(URL)
        with engine.connect() as connection:
            plan = (
                connection.execute(
                    text(
                        "EXPLAIN SELECT * FROM jobs WHERE project_id = :p AND kind = 'fine_tune' "
                        "ORDER BY id DESC LIMIT 21"
                    ),
                    {"p": project_id},
                )
                .scalars()
                .all()
            )
        engine.dispose()
    finally:
        admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')

    for page in ("first", "deep"):
        small, large = results[100][page], results[100_000][page]
        print(
            f"{page} page: 100 jobs p50 {small[0]:.2f} ms p99 {small[1]:.2f} ms | "
            f"100,000 jobs p50 {large[0]:.2f} ms p99 {large[1]:.2f} ms | ratio p50 {large[0] / small[0]:.2f}"
        )
    mixed = results["small_in_large"]["first"]
    print(f"100-job tenant beside a 100,000-job tenant: p50 {mixed[0]:.2f} ms p99 {mixed[1]:.2f} ms")
    print("plan for that tenant:", " / ".join(line.strip() for line in plan))


if __name__ == "__main__":
    main()

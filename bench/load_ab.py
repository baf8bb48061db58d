"""Interleaved A/B of status polling between two checkouts (or two settings) on the same database.

Each side is a `uvicorn api.main:app --workers 2` started from its own tree; the sides take turns (a, b, then
b, a, ...) so that whatever else the shared machine does falls on both. Each turn: 200 warm-up requests, then
wrk -t2 -c16 for 8 s on GET /v1/fine_tuning/jobs/{id}, and the API's own latency histogram for that turn.
Prints each turn and the median requests/s of each side; the ratio is b over a.

A side is `TREE[|UVICORN ARGS[|ENV=VALUE ...]]`, e.g. `/tmp/old` and `.|--loop asyncio` or
`.||GROVE_API_READ_THREADS=8`. An old tree comes from `git worktree add /tmp/old <rev>`.

Usage: make bench-load-ab A=/tmp/old B=. [ROUNDS=4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import api_latency  # bench/api_latency.py, beside this script
import httpx

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
ADMIN = os.environ.get("GROVE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NAME = f"grove_ab_{uuid.uuid4().hex[:8]}"
TMP = Path(tempfile.mkdtemp(prefix="grove-ab-"))
PORT = 8765
ROUTE = "/v1/fine_tuning/jobs/{job_id}"
ENV = (
    os.environ
    | {
        "GROVE_DATABASE_URL": ADMIN.rsplit("/", 1)[0] + f"/{NAME}",
        "GROVE_BROKER_URL": "redis://127.0.0.1:6379/0",
        "GROVE_STORAGE_DIR": str(TMP / "storage"),
        "GROVE_MODEL_STORE_DIR": str(REPO / "var" / "models"),  # an old worktree has no var/ of its own
        "GROVE_FINE_TUNE_QUEUE": f"grove-ab-{uuid.uuid4().hex[:6]}",  # nobody consumes it
        "GROVE_RUN_RECONCILER": "false",
        "GROVE_RUN_WEBHOOK_SENDER": "false",
        "GROVE_RATE_LIMIT": "off",  # wrk polls with one key, far past the default 1200/minute
    }
)
LATENCY_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format("LATENCY p90=%.1fms p99=%.1fms p99.9=%.1fms max=%.1fms\\n",
    latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    latency.max / 1000))
end
"""


def admin(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(sql))
    engine.dispose()


def serve(side: str, log) -> subprocess.Popen:
    tree, _, rest = side.partition("|")
    args, _, envs = rest.partition("|")
    env = ENV | dict(kv.split("=", 1) for kv in envs.split())
    env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=TMP)  # this turn's histogram only
    command = [str(BIN / "uvicorn"), "api.main:app", "--port", str(PORT), "--log-level", "warning"]
    command += args.split() or ["--workers", "2"]
    process = subprocess.Popen(command, cwd=Path(tree).resolve(), env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(150):
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/healthz").status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"{side}: the API did not start (see {TMP}/api.log)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sides = {"a": args.a, "b": args.b}
    os.environ.update(ENV)
    admin(f'CREATE DATABASE "{NAME}"')
    log = (TMP / "api.log").open("w")
    script = TMP / "latency.lua"
    script.write_text(LATENCY_SCRIPT)
    try:
        subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=ENV, check=True, capture_output=True)
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            key = create_key(session, get_or_create_project(session, "ab"))
        auth = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{PORT}"
        api = serve(sides["a"], log)
        try:
            rows = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20))
            upload = httpx.post(
                f"{base}/v1/files", headers=auth, files={"file": ("d.jsonl", rows)}, data={"purpose": "fine-tune"}
            )
            body = {"model": "tiny-llama-test", "training_file": upload.json()["id"]}
            job_id = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=auth, json=body).json()["id"]
        finally:
            api.terminate()
            api.wait()
        url = f"{base}/v1/fine_tuning/jobs/{job_id}"
        rps: dict[str, list[float]] = {"a": [], "b": []}
        for turn in range(args.rounds):
            for name in ("a", "b") if turn % 2 == 0 else ("b", "a"):
                api = serve(sides[name], log)
                try:
                    with httpx.Client(headers=auth) as client:
                        for _ in range(200):
                            client.get(url)
                    wrk = ["wrk", "-t2", "-c16", "-d8s", "--latency", "-s", str(script)]
                    out = subprocess.run(
                        [*wrk, "-H", f"Authorization: Bearer {key}", url], capture_output=True, text=True, check=True
                    ).stdout
                    rps[name].append(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
                    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)
                    tail = re.search(r"LATENCY (.*)", out).group(1)
                    print(
                        f"{name} {sides[name]}: {rps[name][-1]:.0f} req/s, p50 {p50}, {tail}; "
                        f"the API's own answers: {api_latency.describe(base, ROUTE, (0.05,))}",
                        flush=True,
                    )
                finally:
                    api.terminate()
                    api.wait()
        a, b = statistics.median(rps["a"]), statistics.median(rps["b"])
        print(f"median req/s: a {a:.0f}, b {b:.0f}; ratio b/a {b / a:.2f} ({args.rounds} turns each)")
    finally:
        log.close()
        admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        import redis

        redis.Redis().delete(ENV["GROVE_FINE_TUNE_QUEUE"])
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()

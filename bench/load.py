"""Load figures against a real deployment on this machine: PostgreSQL + Redis, `uvicorn --workers 2`.

Usage: make bench-load   (needs wrk and nginx: `apt-get install wrk nginx-light`)

1. GET /v1/fine_tuning/jobs/{id} at steady state: requests/s, p50 and p99 (wrk, 10 s, 16 connections), three
   runs; beside wrk's latency (client side), the API's own request-duration histogram (server side, from
   /metrics), which tells a slow answer from a request that waited outside the app (socket, scheduler, wrk);
   and, as the yardstick of this machine's speed that day, nginx serving the same JSON as a static file;
2. POST /v1/fine_tuning/jobs: requests/s (wrk with a Lua body; the jobs go to a queue nobody consumes);
3. download of a 500 MB file through the API against nginx serving the same file on loopback, same run;
4. the API processes' memory (RSS, sampled every 0.1 s) while 10 clients download that file at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import api_latency  # bench/api_latency.py, beside this script
import httpx

REPO = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("GROVE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
NAME = f"grove_load_{uuid.uuid4().hex[:8]}"
URL = ADMIN.rsplit("/", 1)[0] + f"/{NAME}"
TMP = Path(tempfile.mkdtemp(prefix="grove-load-"))
QUEUE = f"grove-load-{uuid.uuid4().hex[:6]}"
ENV = os.environ | {
    "GROVE_DATABASE_URL": URL,
    "GROVE_BROKER_URL": "redis://127.0.0.1:6379/0",
    "GROVE_STORAGE_DIR": str(TMP / "storage"),
    "GROVE_FINE_TUNE_QUEUE": QUEUE,
    "GROVE_RUN_RECONCILER": "false",
    "GROVE_MAX_QUEUED_JOBS_PER_PROJECT": "1000000",
    "GROVE_RATE_LIMIT": "off",  # one key polls thousands of times a second; the default (1200/minute) would refuse it
    "PROMETHEUS_MULTIPROC_DIR": str(TMP / "prometheus"),  # /metrics sums both API processes
}
os.environ.update(ENV)
BIN = Path(sys.executable).parent


def wait_healthy(base: str) -> None:
    """Wait (at most about 20 s) until a just-started API answers /healthz."""
    for _ in range(100):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)


def fine_tune_body(base: str, auth: dict) -> dict:
    """Upload a 20-row dataset and return a fine-tuning request on it (tiny-llama-test)."""
    rows = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(20))
    file_id = httpx.post(
        f"{base}/v1/files", headers=auth, files={"file": ("d.jsonl", rows)}, data={"purpose": "fine-tune"}
    ).json()["id"]
    return {"model": "tiny-llama-test", "training_file": file_id}


def admin(sql: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(sql))
    engine.dispose()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrk(url: str, key: str, script: Path | None = None) -> dict:
    args = ["wrk", "-t2", "-c16", "-d10s", "--latency", "-H", f"Authorization: Bearer {key}"]
    if script:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout

    def latency(label: str) -> str:
        return re.search(rf"^\s+{label}%\s+(\S+)", out, re.M).group(1)

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
    }


def worker_rss_kb(parent_pid: int) -> list[int]:
    """RSS of each API worker process (the children of `uvicorn --workers N`)."""
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(parent_pid)], capture_output=True, text=True).stdout
    return [int(v) for v in out.split()]


def concurrent_downloads(url: str, headers: list[str], parent_pid: int, clients: int = 10) -> dict:
    """RSS of the API workers before, at most during, and after `clients` simultaneous downloads of `url`."""
    before = worker_rss_kb(parent_pid)
    started = time.perf_counter()
    curls = [
        subprocess.Popen(["curl", "-sf", "-o", "/dev/null", *headers, url], stdout=subprocess.DEVNULL)
        for _ in range(clients)
    ]
    peak = list(before)
    while any(c.poll() is None for c in curls):
        peak = [max(a, b) for a, b in zip(peak, worker_rss_kb(parent_pid), strict=False)]
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    failed = sum(c.returncode != 0 for c in curls)
    return {"before": before, "peak": peak, "after": worker_rss_kb(parent_pid), "seconds": seconds, "failed": failed}


def download_speed(url: str, headers: list[str]) -> float:
    out = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{speed_download}", *headers, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out) / 1e6


def compare_downloads(api: tuple[str, list[str]], nginx: tuple[str, list[str]], rounds: int = 7) -> tuple:
    """Median MB/s of the API and of nginx over `rounds` downloads each, taken in turn: one best-of-3 of each
    after the other moved the ratio between 0.7 and 1.35 from run to run."""
    import statistics

    speeds = {"api": [], "nginx": []}
    for _ in range(rounds):
        speeds["api"].append(download_speed(*api))
        speeds["nginx"].append(download_speed(*nginx))
    return statistics.median(speeds["api"]), statistics.median(speeds["nginx"])


def main() -> None:
    for tool in ("wrk", "nginx", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install wrk nginx-light curl")
    admin(f'CREATE DATABASE "{NAME}"')
    processes: list[subprocess.Popen] = []
    try:
        subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=ENV, check=True, capture_output=True)
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope
        from models.file import File
        from models.ids import new_id
        from models.storage import get_storage

        with session_scope() as session:
            project = get_or_create_project(session, "load")
            key = create_key(session, project)
            project_id = project.id

        port = free_port()
        (TMP / "prometheus").mkdir()
        # The access log (one JSON line a request) goes to a file, as a deployment's log collector takes it.
        api_log = (TMP / "api.log").open("w")
        processes.append(
            subprocess.Popen(
                [str(BIN / "uvicorn"), "api.main:app", "--port", str(port), "--workers", "2", "--log-level", "warning"],
                cwd=REPO,
                env=ENV,
                stdout=api_log,
                stderr=subprocess.STDOUT,
            )
        )
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        auth = {"Authorization": f"Bearer {key}"}
        body = json.dumps(fine_tune_body(base, auth))
        job_id = httpx.post(
            f"{base}/v1/fine_tuning/jobs", headers=auth | {"Content-Type": "application/json"}, content=body
        ).json()["id"]

        get_runs = [wrk(f"{base}/v1/fine_tuning/jobs/{job_id}", key) for _ in range(3)]
        get_server = api_latency.describe(base, "/v1/fine_tuning/jobs/{job_id}")
        script = TMP / "create.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[{body}]]\n'
        )
        create = wrk(f"{base}/v1/fine_tuning/jobs", key, script)

        # A 500 MB result file, registered as the worker would, served by the API and by nginx.
        big_id = new_id("file")
        storage = get_storage()
        storage.ensure()
        path = storage.path_of(storage.key_for(project_id, big_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for _ in range(500):
                f.write(os.urandom(1024 * 1024))
        import hashlib

        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with session_scope() as session:
            session.add(
                File(
                    id=big_id,
                    project_id=project_id,
                    filename="big.bin",
                    purpose="fine-tune-results",
                    bytes=path.stat().st_size,
                    sha256=digest,
                    storage_key=storage.key_for(project_id, big_id),
                )
            )
        nginx_port = free_port()
        conf = TMP / "nginx.conf"
        conf.write_text(
            f"daemon off; user root; pid {TMP}/nginx.pid; error_log {TMP}/nginx.err; worker_processes 2;\n"
            "events {}\nhttp { access_log off; sendfile on;\n"
            f"  server {{ listen 127.0.0.1:{nginx_port}; root {path.parent}; }} }}\n"
        )
        processes.append(subprocess.Popen(["nginx", "-c", str(conf), "-p", str(TMP)]))
        # The machine's own speed moves a lot between sessions (a 4x drop in polling seen from one to the next):
        # nginx answering the same job JSON as a static file, with wrk's same settings, is the yardstick for it.
        job_body = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=auth).content
        (path.parent / "job.json").write_bytes(job_body)
        time.sleep(1)
        nginx_get = wrk(f"http://127.0.0.1:{nginx_port}/job.json", key)
        api_mb_s, nginx_mb_s = compare_downloads(
            (f"{base}/v1/files/{big_id}/content", ["-H", f"Authorization: Bearer {key}"]),
            (f"http://127.0.0.1:{nginx_port}/{big_id}", []),
        )
        rss = [str(v) for v in worker_rss_kb(processes[0].pid)]
        many = concurrent_downloads(
            f"{base}/v1/files/{big_id}/content", ["-H", f"Authorization: Bearer {key}"], processes[0].pid
        )
        for i, get_job in enumerate(get_runs, 1):
            print(
                f"GET job, run {i}: {get_job['rps']:.0f} req/s, p50 {get_job['p50']}, p99 {get_job['p99']}, "
                f"non-2xx {get_job['errors']}"
            )
        print(f"GET job, the API's own durations over the three runs: {get_server}")
        best_get = max(run["rps"] for run in get_runs)
        print(
            f"GET job, the same {len(job_body)}-byte JSON from nginx as a static file: {nginx_get['rps']:.0f} req/s, "
            f"p99 {nginx_get['p99']}; the API's best run is {best_get / nginx_get['rps']:.2f}x of it"
        )
        print(
            f"POST job: {create['rps']:.0f} req/s, p50 {create['p50']}, p99 {create['p99']}, non-2xx {create['errors']}"
        )
        print(
            f"500 MB download (median of 7, in turn): API {api_mb_s:.0f} MB/s, nginx {nginx_mb_s:.0f} MB/s, "
            f"ratio {api_mb_s / nginx_mb_s:.2f}; API worker RSS after: {', '.join(r + ' kB' for r in rss)}"
        )
        mb = lambda values: " / ".join(f"{v / 1024:.0f}" for v in values)  # noqa: E731
        print(
            f"10 clients downloading the 500 MB file at once: {many['seconds']:.1f} s "
            f"({10 * 500 / many['seconds']:.0f} MB/s in all), {many['failed']} failed; API worker RSS (MB) "
            f"before {mb(many['before'])}, peak {mb(many['peak'])}, after {mb(many['after'])}"
        )
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        admin(f'DROP DATABASE IF EXISTS "{NAME}" WITH (FORCE)')
        import redis

        redis.Redis().delete(QUEUE)
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()

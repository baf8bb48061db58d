"""Ecosystem benchmarks (issue 7), against a real API process in the embedded shape (SQLite), no worker.

1. Download: `grove download` (streams to disk, progress bar, sha256 verified) against the reference
   `curl -o` + `sha256sum` of the same file from the same server.
2. Live events: how long after an event is written a client sees it, and how many requests it takes,
   for the SSE stream (`?stream=true`) against the reference, a client polling the event list every second.

Run: `make bench-ecosystem` (or `.venv/bin/python bench/ecosystem_bench.py --mb 256 --events 60`).
Prints one JSON object; docs/BENCHMARKS.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256, help="Size of the downloaded file.")
    parser.add_argument("--events", type=int, default=60, help="Events written for the latency test.")
    parser.add_argument("--interval", type=float, default=0.25, help="Seconds between two events.")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="grove-bench-eco-"))
    env = os.environ | {
        "GROVE_DATABASE_URL": f"sqlite:///{root}/grove.db",
        "GROVE_BROKER_URL": f"sqla+sqlite:///{root}/broker.sqlite",
        "GROVE_STORAGE_DIR": str(root / "storage"),
        "GROVE_WORK_DIR": str(root / "work"),
        "GROVE_FINE_TUNE_QUEUE": "bench-nobody",
        "GROVE_RUN_RECONCILER": "false",
        "GROVE_LOG_LEVEL": "WARNING",
    }
    os.environ.update(env)
    subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=env, check=True, capture_output=True)
    port = free_port()
    api = subprocess.Popen(
        [str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        results = {
            "machine": f"{os.cpu_count()} CPU cores, no GPU",
            "download": bench_download(base, root, args.mb, env),
            "events": bench_events(base, root, args.events, args.interval),
        }
        print(json.dumps(results, indent=2))
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _project_key() -> tuple[str, str]:
    from api.services.keys import create_key, get_or_create_project
    from models.db import session_scope

    with session_scope() as session:
        project = get_or_create_project(session, "bench")
        return project.id, create_key(session, project)


def bench_download(base: str, root: Path, mb: int, env: dict) -> dict:
    from models.db import session_scope
    from models.results import publish_file

    project_id, key = _project_key()
    source = root / "big.bin"
    with source.open("wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    with session_scope() as session:
        file_id = publish_file(session, project_id, source, "big.bin").id
    source.unlink()

    def timed(command: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env | {"GROVE_CONFIG": str(root / "none")})
        return time.perf_counter() - started

    url = f"{base}/v1/files/{file_id}/content"
    curl, grove = [], []
    for i in range(3):
        curl.append(
            timed(
                [
                    "bash",
                    "-c",
                    f"curl -sf -H 'Authorization: Bearer {key}' -o {root}/c{i}.bin {url} && sha256sum {root}/c{i}.bin",
                ]
            )
        )
        (root / f"c{i}.bin").unlink()
        grove.append(
            timed(
                [
                    str(BIN / "grove"),
                    "--base-url",
                    base,
                    "--api-key",
                    key,
                    "download",
                    file_id,
                    "-o",
                    str(root / f"g{i}.bin"),
                ]
            )
        )
        (root / f"g{i}.bin").unlink()
    c, g = statistics.median(curl), statistics.median(grove)
    return {
        "bytes": mb << 20,
        "curl_plus_sha256sum_seconds": round(c, 2),
        "grove_download_seconds": round(g, 2),
        "curl_MBps": round(mb / c, 1),
        "grove_MBps": round(mb / g, 1),
        "grove_over_curl_time": round(g / c, 2),
    }


def bench_events(base: str, root: Path, n_events: int, interval: float) -> dict:
    import httpx

    from api.cli.follow import parse_sse
    from models.db import session_scope
    from models.transitions import add_event

    _, key = _project_key()
    auth = {"Authorization": f"Bearer {key}"}
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(12)))
    with data.open("rb") as f:
        file_id = httpx.post(f"{base}/v1/files", headers=auth, files={"file": f}, data={"purpose": "fine-tune"}).json()[
            "id"
        ]
    job_id = httpx.post(
        f"{base}/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": file_id}
    ).json()["id"]
    written: dict[str, float] = {}
    seen_sse: dict[str, float] = {}
    seen_poll: dict[str, float] = {}
    requests = {"sse": 0, "poll": 0}
    done = threading.Event()

    def sse() -> None:
        requests["sse"] += 1
        with httpx.stream("GET", f"{base}/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                          headers=auth, timeout=120) as response:  # fmt: skip
            for event in parse_sse(response.iter_lines()):
                if event is not None:
                    seen_sse.setdefault(event.id, time.perf_counter())

    def poll() -> None:
        while not done.is_set():
            requests["poll"] += 1
            page = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}, headers=auth).json()
            now = time.perf_counter()
            for event in page["data"]:
                seen_poll.setdefault(event["id"], now)
            done.wait(1.0)

    threads = [threading.Thread(target=sse, daemon=True), threading.Thread(target=poll, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(2)
    for i in range(n_events):
        with session_scope() as session:
            event = add_event(session, job_id, "info", f"bench event {i}")
            session.flush()
            event_id = event.public_id
        written[event_id] = time.perf_counter()
        time.sleep(interval)
    time.sleep(2)
    httpx.post(f"{base}/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth)
    threads[0].join(timeout=30)
    done.set()
    threads[1].join(timeout=5)

    def summary(seen: dict[str, float]) -> dict:
        lat = sorted(seen[e] - t for e, t in written.items() if e in seen)
        return {
            "received": len(lat),
            "mean_ms": round(1000 * statistics.mean(lat)),
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))]),
        }

    sse_s, poll_s = summary(seen_sse), summary(seen_poll)
    return {
        "events": n_events,
        "interval_s": interval,
        "sse": sse_s | {"requests": requests["sse"]},
        "poll_1s": poll_s | {"requests": requests["poll"]},
        "sse_over_poll_mean_latency": round(sse_s["mean_ms"] / poll_s["mean_ms"], 2),
        "poll_over_sse_requests": round(requests["poll"] / requests["sse"], 1),
    }


if __name__ == "__main__":
    main()

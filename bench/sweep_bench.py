"""Sweep benchmark: an 8-trial TPE sweep on the emotion task with smollm2-135m-instruct, on real processes.

Production shape on this machine: a throwaway PostgreSQL database, Redis, one uvicorn API (whose reconciler,
every 2 s, advances the sweep) and Celery workers (`--concurrency 1` each). Steps:

1. upload the first --train-rows rows of emotion train.jsonl (training), the next --valid-rows rows (the sweep's
   validation file: the objective is the trials' validation loss) and the first --eval-rows rows of val.jsonl
   (held out: accuracy);
2. sweep A: max_parallel 1 on one worker (2 torch threads); sweep B: the same request with max_parallel 2 on two
   workers (1 torch thread each). learning_rate (log 1e-5..1e-2) and r (4, 8, 16, 32) are searched, median
   pruning after 3 trials; wall time from POST to succeeded;
3. the default settings: the same fine-tuning request without the searched fields (learning rate 2e-4, r 8);
4. one evaluation job scores the default fine-tune and both sweeps' best trials on the val.jsonl rows
   (accuracy: the generated label; same prompts and greedy decoding for all three).

Prints the rows for docs/BENCHMARKS.md and writes var/bench/sweep/results.json.

Usage: make bench-sweep   (= flock /tmp/grove-heavy.lock .venv/bin/python bench/sweep_bench.py [--trials 8]
       [--steps 20] [--train-rows 400] [--valid-rows 100] [--eval-rows 300] [--model tiny-llama-test --ranks 2,4])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "emotion"
ADMIN = os.environ.get("GROVE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("GROVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL = "smollm2-135m-instruct"
PROMPT = (
    "Classify the emotion of the text as one of: sadness, joy, love, anger, fear, surprise.\nText: {text}\nEmotion:"
)
TRAIN_TEMPLATE = PROMPT + "<|completion|> {label}"  # loss on the label only
EVAL_TEMPLATE = PROMPT + " {label}"
BIN = Path(sys.executable).parent


def rows(path: Path, start: int, count: int) -> str:
    with path.open() as f:
        return "".join(f.readlines()[start : start + count])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, root: Path, env: dict):
        self.root = root
        self.env = os.environ | env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = (self.root / log).open("ab")
        return subprocess.Popen(
            args, cwd=REPO, env=self.env | (env or {}), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_api(self) -> None:
        import httpx

        self.api = self._spawn([str(BIN / "uvicorn"), "api.main:app", "--port", str(self.port)], "api.log")
        for _ in range(200):
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError((self.root / "api.log").read_text()[-3000:])

    def start_workers(self, n: int) -> None:
        threads = str(max(1, 2 // n))
        for i in range(n):
            args = [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--queues",
                    self.env["GROVE_FINE_TUNE_QUEUE"], "--concurrency", "1", "--loglevel", "INFO",
                    "--hostname", f"bench{i}-{uuid.uuid4().hex[:6]}@%h",
                    "--without-gossip", "--without-mingle"]  # fmt: skip
            self.workers.append(self._spawn(args, f"worker{i}.log", {"GROVE_TORCH_THREADS": threads}))

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def stop_workers(self) -> None:
        for process in self.workers:
            self._stop(process)
        self.workers = []

    def stop(self) -> None:
        self.stop_workers()
        if self.api is not None:
            self._stop(self.api)


class Client:
    def __init__(self, url: str, key: str):
        import httpx

        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def upload(self, name: str, content: str) -> str:
        response = self.http.post("/v1/files", files={"file": (name, content)}, data={"purpose": "fine-tune"})
        response.raise_for_status()
        return response.json()["id"]

    def post(self, path: str, body: dict) -> dict:
        response = self.http.post(path, json=body)
        if response.status_code != 200:
            raise RuntimeError(response.text)
        return response.json()

    def wait(self, path: str, timeout: float = 4 * 3600) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            obj = self.http.get(path).json()
            if obj["status"] in ("succeeded", "failed", "cancelled"):
                return obj
            shown = (obj["status"], (obj.get("progress") or {}).get("trials_finished"))
            if shown != last:
                print(f"  {path}: {obj['status']} {obj.get('progress')}", flush=True)
                last = shown
            time.sleep(2)
        raise TimeoutError(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--valid-rows", type=int, default=100)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--parts", default="mp1,mp2", help="mp1 (one worker), mp2 (two workers), or both")
    parser.add_argument("--model", default=MODEL, help="base model (tiny-llama-test for a smoke run)")
    parser.add_argument("--ranks", default="4,8,16,32", help="values of r searched")
    args = parser.parse_args()

    out_dir = REPO / "var" / "bench" / "sweep"
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=out_dir))
    name = f"grove_bench_sweep_{uuid.uuid4().hex[:8]}"
    url = ADMIN.rsplit("/", 1)[0] + f"/{name}"
    env = {
        "GROVE_DATABASE_URL": url,
        "GROVE_BROKER_URL": REDIS,
        "GROVE_STORAGE_DIR": str(root / "storage"),
        "GROVE_WORK_DIR": str(root / "work"),
        "GROVE_MODEL_STORE_DIR": os.environ.get("GROVE_MODEL_STORE_DIR", str(REPO / "var" / "models")),
        "GROVE_FINE_TUNE_QUEUE": f"bench-sweep-{uuid.uuid4().hex[:6]}",
        "GROVE_RUN_RECONCILER": "true",
        "GROVE_RECONCILE_INTERVAL_SECONDS": "2",
        "GROVE_RUN_WEBHOOK_SENDER": "false",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    os.environ.update(env)
    sys.path.insert(0, str(REPO))
    from sqlalchemy import create_engine, text

    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    service = Service(root, env)
    results: dict = {"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, no GPU"}
    try:
        subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=service.env, check=True)
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            key = create_key(session, get_or_create_project(session, "bench-sweep"))
        service.start_api()
        client = Client(service.url, key)
        training = client.upload("train.jsonl", rows(DATA / "train.jsonl", 0, args.train_rows))
        validation = client.upload("valid.jsonl", rows(DATA / "train.jsonl", args.train_rows, args.valid_rows))
        held_out = client.upload("val.jsonl", rows(DATA / "val.jsonl", 0, args.eval_rows))
        base = {
            "model": args.model,
            "training_file": training,
            "validation_file": validation,
            "text_template": TRAIN_TEMPLATE,
            "max_steps": args.steps,
            "hyperparameters": {"batch_size": 8},
            "max_seq_len": 128,
            "eval_every_steps": 5,
            "log_every_steps": 5,
        }
        sweep_request = {
            "fine_tuning": base,
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
                "r": {"type": "categorical", "values": [int(r) for r in args.ranks.split(",")]},
            },
            "strategy": "tpe",
            "num_trials": args.trials,
            "objective": {"metric": "valid_loss"},
            "pruning": {"n_startup_trials": 3},
            "seed": 1,
        }
        best_jobs = {}
        for part in args.parts.split(","):
            workers = {"mp1": 1, "mp2": 2}[part]
            service.start_workers(workers)
            print(f"{part}: sweep with max_parallel {workers} on {workers} worker(s)", flush=True)
            started = time.monotonic()
            sweep = client.post("/v1/sweeps", sweep_request | {"max_parallel": workers})
            done = client.wait(f"/v1/sweeps/{sweep['id']}")
            wall = time.monotonic() - started
            service.stop_workers()
            if done["status"] != "succeeded":
                raise RuntimeError(json.dumps(done)[:4000])
            best = done["best_trial"]
            best_jobs[part] = best["fine_tuning_job"]
            results[part] = {
                "sweep": done["id"],
                "wall_seconds": round(wall, 1),
                "server_seconds": done["finished_at"] - done["created_at"],
                "counts": done["result"]["counts"],
                "best_trial": {k: best[k] for k in ("number", "params", "objective", "fine_tuning_job")},
                "trials": [
                    {k: t[k] for k in ("number", "state", "params", "objective", "intermediate")}
                    for t in done["trials"]
                ],
            }
            print(json.dumps(results[part], indent=1), flush=True)

        service.start_workers(2)
        print("default settings fine-tune", flush=True)
        started = time.monotonic()
        default = client.post("/v1/fine_tuning/jobs", base)
        default_done = client.wait(f"/v1/fine_tuning/jobs/{default['id']}")
        results["default"] = {
            "job": default["id"],
            "wall_seconds": round(time.monotonic() - started, 1),
            "valid_loss": (default_done.get("result") or {}).get("best_valid_loss"),
            "hyperparameters": default_done["hyperparameters"],
            "r": default_done["adapter"]["r"],
        }
        print("evaluation on val.jsonl", flush=True)
        targets = [{"fine_tuning_job": default["id"], "name": "default"}] + [
            {"fine_tuning_job": job, "name": f"best-{part}"} for part, job in best_jobs.items()
        ]
        started = time.monotonic()
        evaluation = client.post(
            "/v1/evaluations",
            {
                "evaluation_file": held_out,
                "targets": targets,
                "text_template": EVAL_TEMPLATE,
                "metrics": ["accuracy", "loss"],
                "labels": {"labels": ["sadness", "joy", "love", "anger", "fear", "surprise"]},
                "generation": {"max_new_tokens": 4, "stop": ["\n"]},
            },
        )
        evaluated = client.wait(f"/v1/evaluations/{evaluation['id']}")
        results["evaluation"] = {
            "job": evaluation["id"],
            "status": evaluated["status"],
            "wall_seconds": round(time.monotonic() - started, 1),
            "summary": (evaluated.get("result") or {}).get("summary"),
        }
        print(json.dumps(results["evaluation"], indent=1), flush=True)
    finally:
        service.stop()
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        from models.db import get_engine

        get_engine().dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"results: {out_dir / 'results.json'} (logs in {root})")


if __name__ == "__main__":
    main()

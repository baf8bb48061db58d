"""Training speed of two base models, same data and settings, jobs interleaved on one embedded stack.

Grove jobs through the HTTP API of a freshly started API + worker (SQLite): the first ROWS rows of
../shared/data/emotion/train.jsonl, "Text: {text}\\nEmotion:<|completion|> {label}", LoRA r=16, alpha=32 on
q/k/v/o, batch 8, max_seq_len 128, lr 5e-4, bf16, MAX_STEPS steps, seed 42. The models alternate (A, B, A, B, ...),
so that whatever else runs on the machine weighs on both alike. Reported per job: the engine's tokens/s (the
mean of its metrics events), trained tokens over the job's wall time, and the first and last training loss. (Peak
memory is not reported: the worker's peak carries over from one job to the next.)

Usage: python bench/model_compare.py [--models gemma3-270m,smollm2-135m-instruct] [--rounds 2] [--rows 200]
       [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from train_bench import BIN, DATA, REPO, free_port, log

OUT = REPO / "var" / "bench" / "model-compare"
TEMPLATE = "Text: {text}\nEmotion:<|completion|> {label}"


def start_stack(root: Path) -> tuple[str, dict, list[subprocess.Popen]]:
    env = os.environ | {
        "GROVE_DATABASE_URL": f"sqlite:///{root}/grove.db",
        "GROVE_BROKER_URL": f"sqla+sqlite:///{root}/broker.sqlite",
        "GROVE_STORAGE_DIR": str(root / "storage"),
        "GROVE_WORK_DIR": str(root / "work"),
        "GROVE_MODEL_STORE_DIR": str(REPO / "var" / "models"),
        "GROVE_FINE_TUNE_QUEUE": "bench-compare",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=env, check=True, capture_output=True)
    key = subprocess.run(
        [str(BIN / "grove"), "bootstrap", "--key-file", str(root / "api-key")],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    api_log, worker_log = (open(root / name, "w") for name in ("api.log", "worker.log"))  # noqa: SIM115
    api = subprocess.Popen(
        [str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--queues", "bench-compare", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}, [api, worker]


def run_job(http, model: str, training_file: str, steps: int) -> dict:
    body = {
        "model": model,
        "training_file": training_file,
        "text_template": TEMPLATE,
        "hyperparameters": {"batch_size": 8},
        "learning_rate": 5e-4,
        "max_seq_len": 128,
        "max_steps": steps,
        "mixed_precision": "bf16",
        "adapter": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "log_every_steps": 5,
        "seed": 42,
    }
    response = http.post("/v1/fine_tuning/jobs", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    while (job := http.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        time.sleep(1)
    if job["status"] != "succeeded":
        raise RuntimeError(f"{model}: job {job['status']}: {job.get('error')}")
    events = http.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=1000").json()["data"]
    metrics = sorted((e["data"] for e in events if e["event_type"] == "metrics"), key=lambda m: m["step"])
    wall = job["finished_at"] - job["started_at"]
    return {
        "model": model,
        "engine_tps": sum(m["tokens_per_second"] for m in metrics) / len(metrics),
        "job_tps": job["trained_tokens"] / wall,
        "wall": wall,
        "first_loss": metrics[0].get("train_loss"),
        "last_loss": metrics[-1].get("train_loss"),
    }


def main() -> None:
    import httpx

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gemma3-270m,smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    train = OUT / "train.jsonl"
    lines = (DATA / "train.jsonl").read_text().splitlines()[: args.rows]
    train.write_text("\n".join(lines) + "\n")
    base, headers, processes = start_stack(OUT)
    results = []
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
            for _ in range(240):
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            with train.open("rb") as f:
                uploaded = http.post("/v1/files", files={"file": f}, data={"purpose": "fine-tune"}).json()["id"]
            for round_number in range(args.rounds):
                for model in args.models.split(","):
                    log(f"round {round_number + 1}: {model}")
                    results.append(run_job(http, model, uploaded, args.steps))
                    log(json.dumps(results[-1]))
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print("| model | engine tokens/s (each job) | trained tokens / job wall | train loss, first → last |")
    print("|---|---|---|---|")
    for model in args.models.split(","):
        mine = [r for r in results if r["model"] == model]
        engine = " / ".join(f"{r['engine_tps']:.0f}" for r in mine)
        job = " / ".join(f"{r['job_tps']:.0f} ({r['wall']:.0f} s)" for r in mine)
        loss = " / ".join(f"{r['first_loss']:.2f} → {r['last_loss']:.2f}" for r in mine)
        print(f"| {model} | {engine} | {job} | {loss} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""`make bench-train`: Olive vs a plain Trainer script vs a Grove job, same data and settings, one run.

1. `olive finetune` (olive-ai 0.13.0 from PyPI, installed by this script into var/bench/olive-venv; the venv
   reuses the project's torch/transformers/peft through a .pth file, pip adds Olive and what else it needs),
   run offline on the local model directory with `-d json --data_files`;
2. bench/train_trainer.py: transformers Trainer + peft, fp32, padded batches, loss on every token;
3. Grove jobs submitted through the HTTP API of a freshly started API + worker (SQLite, empty token cache):
   bf16, then compiled with a cold and a warm compile cache; then bf16 plain and compiled with batch_size 36,
   which is Olive's tokens per optimizer step (its batch of 8 is 8 chunks of 128 tokens of joined rows).

Settings: smollm2-135m-instruct, the first 2,000 rows of ../shared/data/emotion/train.jsonl rendered as
"Text: {text}\\nEmotion: {label}", LoRA r=16, alpha=32 on q/k/v/o, one epoch, batch 8, lr 5e-4, max_seq_len 128.
Each adapter is then scored the same way, here: loss on the label tokens and greedy-generation accuracy on the
first 500 rows of val.jsonl. Peak RSS: the training process (Olive, Trainer) or the worker (Grove).

Writes the "## Training" section of docs/BENCHMARKS.md. Run it alone: `flock /tmp/grove-heavy.lock ...`.
Usage: python bench/train_bench.py [--rows 2000] [--runs olive,trainer,grove] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
MODEL = REPO / "var" / "models" / "smollm2-135m-instruct"
OUT = REPO / "var" / "bench" / "train"
OLIVE_VENV = REPO / "var" / "bench" / "olive-venv"
COMPILE_CACHE = OUT / "compile-cache"
DATA = REPO.parent / "shared" / "data" / "emotion"
TEMPLATE = "Text: {text}\nEmotion: {label}"
GROVE_TEMPLATE = "Text: {text}\nEmotion:<|completion|> {label}"  # the same text; loss on the label only
PROMPT = "Text: {text}\nEmotion:"
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
SETTINGS = {"r": 16, "alpha": 32, "modules": "q_proj,k_proj,v_proj,o_proj", "epochs": 1, "batch": 8, "lr": 5e-4}
MAX_SEQ_LEN = 128
# bf16 on CPU, then compiled twice: the first compile fills the cache, the second job finds it warm.
# Then the same with Olive's tokens per optimizer step: its batch of 8 is 8 chunks of 128 tokens, about 36 rows.
OLIVE_STEP_ROWS = {"hyperparameters": {"n_epochs": 1, "batch_size": 36}}
DEFAULT_GROVE_RUNS = [
    {"mixed_precision": "bf16"},
    {"mixed_precision": "bf16", "compile": True},
    {"mixed_precision": "bf16", "compile": True},
    {"mixed_precision": "bf16"} | OLIVE_STEP_ROWS,
    {"mixed_precision": "bf16", "compile": True} | OLIVE_STEP_ROWS,
]
VAL_ROWS = 500


def log(message: str) -> None:
    print(f"[bench-train {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_child(args: list[str], env: dict | None = None, log_file: Path | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes of the child and its descendants, stdout) of a command."""
    started = time.perf_counter()
    out = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=out, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_file.read_text()[-3000:] if log_file else ""
        raise RuntimeError(f"{args[0]} exited with {process.returncode}:\n{tail}")
    return wall, usage.ru_maxrss * 1024, stdout


def prepare(rows: int) -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    train = OUT / f"emotion-train-{rows}.jsonl"
    train.write_text("".join((DATA / "train.jsonl").read_text().splitlines(keepends=True)[:rows]))
    valid = OUT / f"emotion-val-{VAL_ROWS}.jsonl"
    valid.write_text("".join((DATA / "val.jsonl").read_text().splitlines(keepends=True)[:VAL_ROWS]))
    return train, valid


def count_tokens(train: Path) -> int:
    """Non-padding tokens of one epoch: each row rendered, plus EOS, cut at max_seq_len."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    return sum(min(MAX_SEQ_LEN, len(tokenizer(TEMPLATE.format(**r))["input_ids"]) + 1) for r in rows)


# --- 1. Olive -------------------------------------------------------------------------------------------


def olive_venv() -> Path:
    olive = OLIVE_VENV / "bin" / "olive"
    if olive.exists():
        return olive
    log("creating the Olive venv (pip install olive-ai==0.13.0)")
    subprocess.run([sys.executable, "-m", "venv", str(OLIVE_VENV)], check=True)
    site = next(p for p in sys.path if p.endswith("site-packages") and str(REPO / ".venv") in p)
    target = next((OLIVE_VENV / "lib").glob("python3*")) / "site-packages" / "grove-main-venv.pth"
    target.write_text(site + "\n")  # torch, transformers, peft... from the project's venv
    # Olive reads its data with `datasets`, which it does not declare.
    pip = [str(OLIVE_VENV / "bin" / "pip"), "install", "--quiet", "olive-ai==0.13.0", "datasets"]
    subprocess.run(pip, check=True)
    return olive


def run_olive(train: Path, rows: int) -> dict:
    olive = olive_venv()
    out = OUT / "olive"
    shutil.rmtree(out, ignore_errors=True)
    # Olive caches a workflow's results by its inputs (.olive-cache in the working directory): a second run
    # would return the first one's adapter in seconds.
    shutil.rmtree(REPO / ".olive-cache", ignore_errors=True)
    args = [
        str(olive), "finetune", "-m", str(MODEL), "-o", str(out),
        "--method", "lora", "--lora_r", str(SETTINGS["r"]), "--lora_alpha", str(SETTINGS["alpha"]),
        "--target_modules", SETTINGS["modules"],
        "-d", "json", "--data_files", str(train), "--text_template", TEMPLATE, "--max_seq_len", str(MAX_SEQ_LEN),
        "--per_device_train_batch_size", str(SETTINGS["batch"]), "--num_train_epochs", str(SETTINGS["epochs"]),
        "--learning_rate", str(SETTINGS["lr"]), "--disable_telemetry",
        # Olive joins the rows and cuts 128-token chunks, keeping 256 of them unless told: every row, as the others.
        "--max_samples", str(rows),
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log("olive finetune (its default dtype, bf16)")
    wall, rss, _ = run_child(args, env, OUT / "olive.log")
    adapter = next(p.parent for p in out.rglob("adapter_config.json"))
    steps = re.findall(r"(\d+)/(\d+) \[", (OUT / "olive.log").read_text())
    notes = f"{steps[-1][1]} steps of 8 chunks: the rows joined and cut into 128-token chunks" if steps else ""
    return {
        "run": "Olive 0.13 `olive finetune` (default bf16)",
        "wall": wall,
        "rss": rss,
        "adapter": adapter,
        "notes": notes,
    }


# --- 2. Trainer script ----------------------------------------------------------------------------------


def run_trainer(train: Path) -> dict:
    out = OUT / "trainer"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        str(BIN / "python"), "bench/train_trainer.py", str(MODEL), str(train), str(out),
        "--template", TEMPLATE, "--epochs", str(SETTINGS["epochs"]), "--batch-size", str(SETTINGS["batch"]),
        "--lr", str(SETTINGS["lr"]), "--max-seq-len", str(MAX_SEQ_LEN), "--r", str(SETTINGS["r"]),
        "--alpha", str(SETTINGS["alpha"]), "--target-modules", SETTINGS["modules"],
    ]  # fmt: skip
    log("transformers Trainer + peft (fp32)")
    wall, rss, stdout = run_child(args, os.environ | {"HF_HUB_OFFLINE": "1"}, OUT / "trainer.log")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"run": "transformers Trainer + peft script (fp32)", "wall": wall, "rss": rss, "adapter": out} | {
        "notes": f"train_runtime {result['train_seconds']:.0f} s"
    }


# --- 3. Grove -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_grove(train: Path, valid: Path, extra: dict, number: int) -> dict:
    import httpx

    # One directory per run: the adapters are scored after the last run, each must still be there.
    root = OUT / f"grove-{number}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = os.environ | {
        "GROVE_DATABASE_URL": f"sqlite:///{root}/grove.db",
        "GROVE_BROKER_URL": f"sqla+sqlite:///{root}/broker.sqlite",
        "GROVE_STORAGE_DIR": str(root / "storage"),
        "GROVE_WORK_DIR": str(root / "work"),  # empty: no tokenization cache to help
        "GROVE_MODEL_STORE_DIR": str(MODEL.parent),
        "GROVE_FINE_TUNE_QUEUE": "bench-train",
        "HF_HUB_OFFLINE": "1",
        # Shared by this bench's Grove runs: the first compile is cold, a later one finds its kernels.
        "TORCHINDUCTOR_CACHE_DIR": str(COMPILE_CACHE),
    }
    compile_cache = "warm" if any(COMPILE_CACHE.glob("*")) else "cold"
    subprocess.run([str(BIN / "alembic"), "upgrade", "head"], cwd=REPO, env=env, check=True, capture_output=True)
    key = subprocess.run(
        [str(BIN / "grove"), "bootstrap", "--key-file", str(root / "api-key")],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    logs = [open(root / name, "w") for name in ("api.log", "worker.log")]  # noqa: SIM115
    api = subprocess.Popen(
        [str(BIN / "uvicorn"), "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    worker = subprocess.Popen(
        [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--queues", "bench-train", "--concurrency", "1",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=REPO, env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        # A deployed worker has been up for a while: let it finish importing torch & co. before the job starts.
        for _ in range(120):
            if "Training libraries loaded" in (root / "worker.log").read_text():
                break
            time.sleep(0.5)

        def upload(path: Path) -> str:
            with path.open("rb") as f:
                response = httpx.post(
                    f"{base}/v1/files", headers=headers, files={"file": f}, data={"purpose": "fine-tune"}, timeout=60
                )
            response.raise_for_status()
            return response.json()["id"]

        body = {
            "model": MODEL.name,
            "training_file": upload(train),
            "validation_file": upload(valid),
            "text_template": GROVE_TEMPLATE,
            "hyperparameters": {"n_epochs": SETTINGS["epochs"], "batch_size": SETTINGS["batch"]},
            "learning_rate": SETTINGS["lr"],
            "max_seq_len": MAX_SEQ_LEN,
            "adapter": {
                "r": SETTINGS["r"],
                "alpha": SETTINGS["alpha"],
                "target_modules": SETTINGS["modules"].split(","),
            },
            "log_every_steps": 25,
            "eval_every_steps": 50,
            "seed": 42,
        } | extra
        log(f"Grove job ({json.dumps(extra)})")
        response = httpx.post(f"{base}/v1/fine_tuning/jobs", headers=headers, json=body, timeout=60)
        response.raise_for_status()
        job_id = response.json()["id"]
        while True:
            job = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=headers, timeout=60).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        if job["status"] != "succeeded":
            raise RuntimeError(f"Grove job {job['status']}: {job.get('error')}")
        events = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}/events?limit=1000", headers=headers, timeout=60)
        metrics = [e["data"] for e in events.json()["data"] if e["event_type"] == "metrics"]
        content = httpx.get(f"{base}/v1/files/{job['result_files'][0]}/content", headers=headers, timeout=120)
        adapter = root / "adapter"
        adapter.mkdir()
        (root / "adapter.tar").write_bytes(content.content)
        shutil.unpack_archive(root / "adapter.tar", adapter, format="tar")
        step_tps = sum(m["tokens_per_second"] for m in metrics) / len(metrics)
        last = max(metrics, key=lambda m: m["step"])
        compiled = next((e["data"].get("compiled_layers") for e in events.json()["data"] if e["event_type"] == "info"
                         and "compiled_layers" in (e.get("data") or {})), None)  # fmt: skip
        notes = f"compiled {compiled} layers, compile cache {compile_cache}; " if compiled else ""
        return {
            "run": f"Grove job through the API ({', '.join(f'{k}={v}' for k, v in extra.items()) or 'defaults'})",
            "wall": job["finished_at"] - job["started_at"],
            "rss": max(m.get("peak_memory_mb", 0) for m in metrics) * 2**20,
            "adapter": adapter,
            "notes": notes + f"engine {step_tps:.0f} tokens/s in steps; padding {last.get('padding_fraction', 0):.1%}; "
            f"its full_valid_loss {last.get('full_valid_loss')}",
        }
    finally:
        for process in (worker, api):
            os.killpg(process.pid, signal.SIGTERM)
        for process in (worker, api):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for f in logs:
            f.close()


# --- scoring ------------------------------------------------------------------------------------------


def score(adapter: Path | None, valid: Path) -> tuple[float, float]:
    """(mean loss over the label tokens, greedy accuracy) on the validation rows."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(MODEL))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    rows = [json.loads(line) for line in valid.read_text().splitlines()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum, n_tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 50):
            chunk = rows[start : start + 50]
            prompts = [tokenizer(PROMPT.format(**r))["input_ids"] for r in chunk]
            labels = [tokenizer(" " + r["label"])["input_ids"] for r in chunk]
            # Loss: right-padded prompt + label, on the label tokens.
            seqs = [p + lab for p, lab in zip(prompts, labels, strict=True)]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            target = torch.full((len(seqs), width), -100)
            for i, (p, lab) in enumerate(zip(prompts, labels, strict=True)):
                ids[i, : len(p) + len(lab)] = torch.tensor(p + lab)
                mask[i, : len(p) + len(lab)] = 1
                target[i, len(p) : len(p) + len(lab)] = torch.tensor(lab)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            loss_sum += float(F.cross_entropy(logits.transpose(1, 2), target[:, 1:], reduction="sum"))
            n_tokens += int((target[:, 1:] != -100).sum())
            # Accuracy: left-padded prompts, greedy, the first word of the answer.
            width = max(map(len, prompts))
            ids = torch.full((len(prompts), width), pad)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=pad
            )
            for r, generated in zip(chunk, out[:, width:], strict=True):
                words = re.findall(r"[a-z]+", tokenizer.decode(generated, skip_special_tokens=True).lower())
                correct += bool(words) and words[0] == r["label"]
    return loss_sum / n_tokens, correct / len(rows)


# --- report -----------------------------------------------------------------------------------------------


def write_section(results: list[dict], base: tuple[float, float], tokens: int, rows: int, command: str) -> str:
    olive = next((r for r in results if r["run"].startswith("Olive")), None)
    lines = [
        "## Training",
        "",
        f"`{command}` — {datetime.date.today().isoformat()}, {platform.machine()} CPU with "
        f"{os.cpu_count()} cores, no GPU, all three in one run (bench/train_bench.py). smollm2-135m-instruct, the "
        f"first {rows} rows of emotion/train.jsonl as `Text: {{text}}\\nEmotion: {{label}}`, LoRA r=16 alpha=32 "
        "on q/k/v/o, 1 epoch, batch 8, lr 5e-4, max_seq_len 128. Wall time: the training process (Olive, "
        "Trainer) or the job from start to published adapter (Grove). Tokens/s: the epoch's "
        f"{tokens:,} non-padding tokens over the wall time. Validation loss (on the label tokens) and accuracy "
        f"(greedy, first word = label) scored the same way for every adapter on the first {VAL_ROWS} rows of "
        "emotion/val.jsonl.",
        "",
        "| run | wall time | speed-up vs Olive | tokens/s | peak RSS | val loss (label) | accuracy | notes |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model, no adapter | | | | | {base[0]:.3f} | {base[1]:.1%} | |",
    ]
    for r in results:
        ratio = f"{olive['wall'] / r['wall']:.2f}x" if olive and r is not olive else ""
        lines.append(
            f"| {r['run']} | {r['wall']:.0f} s | {ratio} | {tokens / r['wall']:.0f} | {r['rss'] / 2**30:.2f} GB "
            f"| {r['loss']:.3f} | {r['accuracy']:.1%} | {r.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"


def update_benchmarks(section: str) -> None:
    path = REPO / "docs" / "BENCHMARKS.md"
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    match = re.search(r"^## Training\n.*?(?=^## |\Z)", text, flags=re.S | re.M)
    text = text[: match.start()] + section + "\n" + text[match.end() :] if match else text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--runs", default="olive,trainer,grove")
    parser.add_argument(
        "--grove",
        default=json.dumps(DEFAULT_GROVE_RUNS),
        help="extra Grove job fields (JSON object), or a list of them: one Grove job each",
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, valid = prepare(args.rows)
    runs = args.runs.split(",")
    results = []
    if "olive" in runs:
        results.append(run_olive(train, args.rows))
    if "trainer" in runs:
        results.append(run_trainer(train))
    if "grove" in runs:
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)
        extras = json.loads(args.grove)
        for number, extra in enumerate(extras if isinstance(extras, list) else [extras], 1):
            results.append(run_grove(train, valid, extra, number))
    log("scoring the adapters")
    base = score(None, valid)
    for r in results:
        r["loss"], r["accuracy"] = score(r["adapter"], valid)
        log(f"{r['run']}: {r['wall']:.0f} s, {r['rss'] / 2**30:.2f} GB, loss {r['loss']:.3f}, acc {r['accuracy']:.1%}")
    command = "make bench-train" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    section = write_section(results, base, count_tokens(train), args.rows, command)
    print(section)
    if not args.no_write:
        update_benchmarks(section)


if __name__ == "__main__":
    main()

"""Evaluation benchmark: smollm2-135m-instruct on the emotion reference task, timed end to end.

Runs real evaluation jobs in-process (the API creates them, the worker stage runs them) against a throwaway
SQLite database, on the first N rows of ../shared/data/emotion/val.jsonl with a template that lists the six
labels, and prints rows for docs/BENCHMARKS.md:

1. raw prompts (as a fine-tune on this template is trained), strict and lenient accuracy, 500 rows;
2. the same through the model's chat template (how an instruct model is asked), 500 rows;
3. the reference: the same raw job one example at a time (batch_size 1) against batched, on the first 100 rows,
   measured in this run;
4. onnx: an int4 export of the base model (a real export job), scored streamed on onnxruntime-genai;
5. gsm: generation metrics on long answers, the first 20 GSM8K rows through the chat template (exact match on the
   number after ####, ROUGE-L, BLEU), 256 new tokens;
6. finetune (not in the default parts: about half an hour): the reference task end to end, a LoRA fine-tune
   with default settings on the first --train-rows training rows, its int4 export, and one evaluation job
   scoring base, adapter and export on the same val rows. --completion-only trains on the label alone (the
   template's completion marker before it); --mixed-precision sets the job's mixed_precision (auto, the
   default, is fp32 on a CPU and bf16 on a GPU that has it).

Usage: make bench-eval   (or: flock /tmp/grove-heavy.lock .venv/bin/python bench/eval_emotion.py [--rows 500]
       [--parts raw,chat,reference,onnx,gsm])
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "emotion" / "val.jsonl"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
PARTS = ("raw", "chat", "reference", "onnx", "gsm")
TRAIN = REPO.parent / "shared" / "data" / "emotion" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
TEMPLATE = (
    "Classify the emotion of the text as one of: sadness, joy, love, anger, fear, surprise.\n"
    "Text: {text}\nEmotion: {label}"
)


def setup(root: Path) -> None:
    os.environ.update(
        {
            "GROVE_DATABASE_URL": f"sqlite:///{root}/grove.db",
            "GROVE_BROKER_URL": f"sqla+sqlite:///{root}/broker.sqlite",
            "GROVE_STORAGE_DIR": str(root / "storage"),
            "GROVE_WORK_DIR": str(root / "work"),
            "GROVE_MODEL_STORE_DIR": os.environ.get("GROVE_MODEL_STORE_DIR", str(REPO / "var" / "models")),
            "GROVE_RUN_RECONCILER": "false",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    sys.path.insert(0, str(REPO))
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = os.environ["GROVE_DATABASE_URL"]
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


class Api:
    def __init__(self):
        from fastapi.testclient import TestClient

        from api.app import create_app
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            self.headers = {"Authorization": f"Bearer {create_key(session, get_or_create_project(session, 'bench'))}"}
        self.client = TestClient(create_app())

    def upload(self, rows: list[dict], name: str = "val.jsonl") -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows)
        response = self.client.post(
            "/v1/files", headers=self.headers, files={"file": (name, body)}, data={"purpose": "fine-tune"}
        )
        response.raise_for_status()
        return response.json()["id"]

    def post(self, path: str, body: dict) -> dict:
        response = self.client.post(path, headers=self.headers, json=body)
        if response.status_code != 200:
            raise SystemExit(f"{path}: {response.status_code} {response.text}")
        return response.json()

    def get(self, path: str) -> dict:
        return self.client.get(path, headers=self.headers).json()


def run_job(job_id: str, kind: str) -> float:
    from worker.tasks import run_job as run

    started = time.perf_counter()
    outcome = run(job_id, kind)
    if outcome != "done":
        raise SystemExit(f"{kind} job {job_id}: {outcome}")
    return time.perf_counter() - started


def evaluate(api: Api, file_id: str, targets: list, **settings) -> tuple[dict, float]:
    body = {"evaluation_file": file_id, "targets": targets, "text_template": TEMPLATE, "metrics": ["accuracy"]}
    job = api.post("/v1/evaluations", body | settings)
    seconds = run_job(job["id"], "evaluation")
    job = api.get(f"/v1/evaluations/{job['id']}")
    if job["status"] != "succeeded":
        raise SystemExit(f"evaluation {job['id']} {job['status']}: {job['error']}")
    return api.get(f"/v1/evaluations/{job['id']}/report"), seconds


def describe(report: dict, seconds: float, target: int = 0) -> str:
    t = report["targets"][target]
    by_match = t["details"]["accuracy_by_match"]
    return (
        f"{report['n_examples']} rows in {seconds:.0f} s ({report['n_examples'] / seconds:.1f} rows/s); "
        f"strict {100 * by_match['prefix']:.1f}%, lenient {100 * by_match['first_mention']:.1f}%; "
        f"{t['details']['generated_tokens']} tokens generated"
    )


class Rows(list):
    """Result rows, each also printed as soon as it is measured (a later failure loses none)."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"| {row[0]} | {row[1]} |", flush=True)
        super().append(row)

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--reference-rows", type=int, default=100)
    parser.add_argument("--gsm-rows", type=int, default=20)
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--completion-only", action="store_true", help="fine-tune on the label tokens only")
    parser.add_argument("--mixed-precision", default="auto", help="the fine-tune's mixed_precision")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}, finetune")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    root = Path(tempfile.mkdtemp(prefix="grove-bench-eval-"))
    setup(root)
    api = Api()
    with DATA.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.rows), strict=False)]
    file_id = api.upload(rows)
    generation = {"max_new_tokens": 16, "stop": ["\n"]}
    print(f"\n## eval bench: {MODEL}, emotion val.jsonl, template lists the six labels", flush=True)
    results = Rows()

    if "raw" in parts:
        raw, raw_s = evaluate(api, file_id, [MODEL], generation=generation)
        results.append(("raw prompt, batch 16, max 16 new tokens, stop at newline", describe(raw, raw_s)))
    if "chat" in parts:
        chat, chat_s = evaluate(api, file_id, [MODEL], use_chat_template=True, generation={"max_new_tokens": 32})
        results.append(("chat template, batch 16, max 32 new tokens", describe(chat, chat_s)))
    if "reference" in parts:
        results.append(reference(api, file_id, args.reference_rows, generation))
    if "onnx" in parts:
        export = api.post("/v1/exports", {"source": {"model": MODEL}, "precision": "int4"})
        export_s = run_job(export["id"], "export")
        onnx, onnx_s = evaluate(api, file_id, [{"export_job": export["id"], "name": "int4"}], generation=generation)
        results.append((f"int4 ONNX export of the base (export job: {export_s:.0f} s)", describe(onnx, onnx_s)))
    if "gsm" in parts:
        results.append(gsm8k(api, args.gsm_rows))
    if "finetune" in parts:
        results += finetune(api, file_id, args.train_rows, generation, args.completion_only, args.mixed_precision)

    print("\n## eval bench: all rows")
    for what, figure in results:
        print(f"| {what} | {figure} |")


def reference(api: Api, file_id: str, n: int, generation: dict) -> tuple[str, str]:
    subset = {"max_examples": n, "report_examples": n}
    one, one_s = evaluate(api, file_id, [MODEL], **subset, generation=generation | {"batch_size": 1})
    batched, batched_s = evaluate(api, file_id, [MODEL], **subset, generation=generation)
    same = [e["outputs"][MODEL]["text"] for e in one["examples"]] == [
        e["outputs"][MODEL]["text"] for e in batched["examples"]
    ]
    return (
        f"reference: first {n} rows one at a time (batch_size 1) vs batched (16)",
        f"{one_s:.0f} s vs {batched_s:.0f} s: batched is {one_s / batched_s:.2f}x faster; "
        f"identical outputs on the first {len(one['examples'])} rows: {same}",
    )


def finetune(
    api: Api, file_id: str, n: int, generation: dict, completion_only: bool, mixed_precision: str
) -> list[tuple[str, str]]:
    with TRAIN.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n), strict=False)]
    training = api.upload(rows, "train.jsonl")
    template = TEMPLATE.replace(" {label}", "<|completion|> {label}") if completion_only else TEMPLATE
    request = {"model": MODEL, "training_file": training, "text_template": template, "mixed_precision": mixed_precision}
    job = api.post("/v1/fine_tuning/jobs", request)
    train_s = run_job(job["id"], "fine_tune")
    job = api.get(f"/v1/fine_tuning/jobs/{job['id']}")
    if job["status"] != "succeeded":
        raise SystemExit(f"fine-tune {job['id']} {job['status']}: {job['error']}")
    source = {"adapters": [{"fine_tuning_job": job["id"]}]}
    export = api.post("/v1/exports", {"source": source, "precision": "int4"})
    export_s = run_job(export["id"], "export")
    targets = [MODEL, {"fine_tuning_job": job["id"], "name": "adapter"}, {"export_job": export["id"], "name": "int4"}]
    report, seconds = evaluate(api, file_id, targets, generation=generation)
    hp = job["hyperparameters"]
    rows = [
        (
            f"fine-tune, defaults, first {n} training rows, mixed_precision {mixed_precision}"
            + (", loss on the label only" if completion_only else ", loss on the whole text"),
            f"{train_s:.0f} s; {job['progress']['total_steps']} steps (batch {hp['batch_size']}, "
            f"{hp['n_epochs']} epoch(s), lr {hp.get('learning_rate')})",
        ),
        ("int4 export of the adapter (export job, merged, parity gate included)", f"{export_s:.0f} s"),
    ]
    for i, target in enumerate(report["targets"]):
        per_target = describe(report, target["seconds"], i).split("; ", 1)[1]
        rows.append(
            (
                f"evaluation job, target {target['name']} ({target['backend']})",
                f"{target['seconds']:.0f} s; {per_target}",
            )
        )
    rows.append(("evaluation job, all three targets", f"{seconds:.0f} s"))
    return rows


def gsm8k(api: Api, n: int) -> tuple[str, str]:
    with GSM8K.open() as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n), strict=False)]
    file_id = api.upload(rows, "gsm8k.jsonl")
    report, seconds = evaluate(
        api,
        file_id,
        [MODEL],
        text_template="Question: {question}\nAnswer: {answer}",
        use_chat_template=True,
        metrics=["exact_match", "rouge_l", "bleu"],
        normalization={"regex": r"####\s*(-?[\d,.]+)"},
        generation={"max_new_tokens": 256},
    )
    metrics, details = report["summary"][MODEL], report["targets"][0]["details"]
    return (
        f"GSM8K, first {n} rows, chat template, max 256 new tokens",
        f"{seconds:.0f} s; exact_match (#### number) {metrics['exact_match']}, rouge_l {metrics['rouge_l']}, "
        f"bleu {metrics['bleu']}; {details['generated_tokens']} tokens, "
        f"{details['generated_tokens_per_second']} tokens/s",
    )


if __name__ == "__main__":
    main()

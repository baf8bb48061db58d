"""scripts/gpu-check --dry-run: the GPU check's code end to end on the CPU, so it is known to work when a GPU is lent.

The run gets its own model store (a copy of tiny-llama-test, so the second model is absent and skipped), its own
training rows and its own JSON file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS = ("grove lora bf16", "grove qlora 4-bit", "trainer + peft bf16")


def test_dry_run_prints_every_row(tiny_model, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_model, store / "tiny-llama-test")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"i feel fine on day {i}", "label": "joy"}) + "\n" for i in range(16)))
    out = tmp_path / "gpu-check.json"

    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu-check"), "--dry-run"]
        + ["--store", str(store), "--data", str(data), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["steps"] == 4 and report["batch_size"] == 4
    assert report["data"] == str(data) and report["probe_tflops"] > 0
    rows = {(row["model"], row["run"]): row for row in report["training"]}
    assert set(rows) == {(model, run) for model in ("tiny-llama-test", "gemma3-270m") for run in RUNS}
    for run in ("grove lora bf16", "trainer + peft bf16"):
        row = rows["tiny-llama-test", run]
        assert row["steps"] == 4 and row["tokens_per_second"] > 0 and row["steady_tokens"] > 0, row
        assert row["mfu_probe"] > 0 and row["mfu_spec"] is None and row["train_loss"] > 0, row
    lora = rows["tiny-llama-test", "grove lora bf16"]
    trainer = rows["tiny-llama-test", "trainer + peft bf16"]
    assert lora["vs_trainer"] == lora["tokens_per_second"] / trainer["tokens_per_second"]
    assert lora["mixed_precision"] == "bf16"
    assert "CUDA only" in rows["tiny-llama-test", "grove qlora 4-bit"]["skipped"]
    for run in RUNS:
        assert "gemma3-270m" in rows["gemma3-270m", run]["skipped"]
    export = report["export"]
    assert export["model"] == "tiny-llama-test" and export["provider"] == "cpu", export
    assert export["generated_tokens"] == 64 and export["tokens_per_second"] > 0, export

    table = done.stdout
    for model, run in rows:
        assert f"| {model} | {run} |" in table
    assert "| tiny-llama-test + Grove LoRA adapter, fp32, cpu EP |" in table
    assert table.startswith("Dry run on the CPU")

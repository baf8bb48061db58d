"""Export benchmark: smollm2-135m-instruct plus emotion adapters, ONNX (onnxruntime-genai) against PyTorch.

    make bench-export          # = flock /tmp/grove-heavy.lock .venv/bin/python bench/export_bench.py

Everything is measured in one run on the same machine, through the export stage's own building blocks
(worker/onnx_build.py, worker/onnx_package.py, worker/onnx_gate.py):
1. two emotion LoRA adapters (r=8, all-linear; 2,000 and 120 training rows, 1 epoch, batch 8, lr 5e-4, bf16,
   loss on the label only), trained with the service's trainer and cached under var/bench/export/ (--retrain
   trains them again);
2. export wall time and artifact size: base int4 and fp32, and int4 merged / separate / multi with adapters;
3. the parity gate's numbers for each int4 export (token match, mean |logit diff|);
4. generation tokens/s, 64 new greedy tokens, batch 1, same prompt: int4 ONNX (each mode, adapter active)
   against PyTorch fp32 `generate` (base, and base + peft adapter);
5. emotion accuracy on the first N rows of val.jsonl: int4 ONNX (merged with the service's default recipe,
   k-quant with the sensitive layers in int8; all-int4 k-quant; all-int4 round-to-nearest; multi with the
   adapter active) against the PyTorch adapter;
6. multi-adapter switching: set_active_adapter against loading a separate merged model;
7. if Olive is importable (PYTHONPATH, see docs/BENCHMARKS.md): `olive auto-opt --use_model_builder` +
   `olive generate-adapter` on the same inputs: wall time, and whether the output loads and matches.

Writes var/bench/export/results.json and prints the markdown rows for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = REPO.parent / "shared" / "data" / "emotion"
OUT = REPO / "var" / "bench" / "export"
MODEL = "smollm2-135m-instruct"
TEMPLATE = "Text: {text}\nEmotion: {label}"
TRAIN_TEMPLATE = TEMPLATE.replace(" {label}", "<|completion|> {label}")
PROMPT = "Write a short story about a robot who learns to paint."


def rows(path: Path, n: int, offset: int = 0) -> list[dict]:
    with path.open() as f:
        lines = f.readlines()[offset : offset + n]
    return [json.loads(line) for line in lines]


class _Hooks:
    """worker.train.TrainingHooks that only print (extra arguments accepted as the protocol grows)."""

    def on_start(self, total_steps, stats, *args):
        print(f"  training {total_steps} steps", flush=True)

    def on_metrics(self, *args):
        pass

    def on_checkpoint(self, *args):
        pass

    def on_event(self, *args):
        pass

    def should_stop(self):
        return False

    def should_pause(self):
        return False


def train(name: str, n_rows: int, offset: int, base_dir: Path, retrain: bool) -> Path:
    from jobs.fine_tune_spec import FineTuneSpec
    from worker.data import read_training_examples
    from worker.train import train_adapter

    destination = OUT / "adapters" / name
    if destination.joinpath("adapter_model.safetensors").is_file() and not retrain:
        return destination
    work = OUT / "train" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = work / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows(DATA / "train.jsonl", n_rows, offset)))
    examples = read_training_examples(source, TRAIN_TEMPLATE)
    spec = FineTuneSpec(
        model=MODEL,
        training_file="bench",
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        learning_rate=5e-4,
        adapter={"r": 8, "alpha": 16, "target_modules": "all-linear"},
        text_template=TRAIN_TEMPLATE,
        mixed_precision="bf16",
        seed=1,
    )
    outcome = train_adapter(spec, base_dir, examples, None, work, _Hooks())
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(outcome.adapter_dir, destination)
    shutil.rmtree(work, ignore_errors=True)
    return destination


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "adapters" not in p.parts)


def export(name, base_dir, precision, mode, adapters: dict[str, Path], **quantization) -> tuple[Path, float, dict]:
    """Build (and package) like worker/export.py does; returns the package dir, wall seconds, adapter files."""
    from jobs.export_spec import Quantization
    from worker import onnx_build, onnx_package

    default = Quantization()
    quantized = {
        "quantization_method": quantization.get("method", default.method),
        "int8_sensitive_layers": quantization.get("int8_sensitive_layers", default.int8_sensitive_layers),
    }

    package = OUT / "packages" / name
    shutil.rmtree(package, ignore_errors=True)
    cache = OUT / "cache"
    names = list(adapters)
    started = time.perf_counter()
    files: dict[str, Path] = {}
    if mode is None:
        onnx_build.build(base_dir, package, precision, "cpu", cache_dir=cache, **quantized)
    elif mode == "merged":
        merged = onnx_build.merge_adapter(base_dir, adapters[names[0]], OUT / "merged-tmp")
        onnx_build.build(merged, package, precision, "cpu", cache_dir=cache, **quantized)
        shutil.rmtree(merged)
    else:
        config = json.loads((adapters[names[0]] / "adapter_config.json").read_text())
        exclude = onnx_build.lora_node_names(onnx_build.num_hidden_layers(base_dir), config["target_modules"])
        onnx_build.build(
            base_dir,
            package,
            precision,
            "cpu",
            cache_dir=cache,
            adapter_dir=adapters[names[0]],
            exclude_nodes=exclude,
            **quantized,
        )
        if mode == "multi":
            inputs = onnx_package.make_lora_inputs(package)
            for adapter_name, adapter_dir in adapters.items():
                files[adapter_name] = package / "adapters" / f"{adapter_name}.onnx_adapter"
                onnx_package.write_onnx_adapter(adapter_dir, inputs, files[adapter_name])
    return package, time.perf_counter() - started, files


def gate(package, base_dir, mode, adapters, files, precision) -> dict:
    from jobs.export_spec import FIXED_PROMPTS, GATE_DEFAULTS
    from worker.onnx_gate import Check, run_gate

    names = list(adapters)
    if mode == "multi":
        checks = [Check("base", None, None)] + [Check(n, n, n) for n in names]
    elif mode in ("merged", "separate"):
        checks = [Check(names[0], None, names[0])]
        adapters = {names[0]: adapters[names[0]]}
    else:
        checks = [Check("base", None, None)]
        adapters = {}
    prompts = [TEMPLATE.split("{label}")[0].format_map(r) for r in rows(DATA / "val.jsonl", 3)] + FIXED_PROMPTS
    min_match, max_diff = GATE_DEFAULTS[precision]
    started = time.perf_counter()
    result = run_gate(
        package,
        base_dir,
        checks,
        prompts,
        adapter_dirs=adapters,
        onnx_adapters=files or None,
        max_new_tokens=16,
        min_token_match=min_match,
        max_mean_abs_logit_diff=max_diff,
    )
    report = result.report | {"seconds": round(time.perf_counter() - started, 1)}
    for check in report["checks"]:
        check.pop("sample", None)
    return report


# --- generation speed ----------------------------------------------------------------------------


def og_load(package: Path, files: dict[str, Path] | None = None):
    import onnxruntime_genai as og

    model = og.Model(str(package))
    adapters = None
    if files:
        adapters = og.Adapters(model)
        for name, path in files.items():
            adapters.load(str(path), name)
    return model, og.Tokenizer(model), adapters


def og_generate(model, ids, n, adapters=None, active=None, stop_at_eos=False) -> list[int]:
    """n greedy tokens; exactly n (end of text suppressed) for speed figures, up to n with stop_at_eos."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    floor = {} if stop_at_eos else {"min_length": len(ids) + n}
    params.set_search_options(max_length=len(ids) + n, do_sample=False, **floor)
    generator = og.Generator(model, params)
    if active is not None:
        generator.set_active_adapter(adapters, active)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


def og_tokens_per_second(model, ids, adapters=None, active=None, n=64, repeats=3) -> float:
    og_generate(model, ids, 8, adapters, active)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = og_generate(model, ids, n, adapters, active)
        times.append(time.perf_counter() - started)
        assert len(out) == n, len(out)
    return n / statistics.median(times)


def torch_model(base_dir: Path, adapter_dir: Path | None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()


def torch_generate(model, ids, n, stop_at_eos=False) -> list[int]:
    import torch

    floor = {} if stop_at_eos else {"min_new_tokens": n}
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, **floor)
    return out[0, len(ids) :].tolist()


def torch_tokens_per_second(model, ids, n=64, repeats=3) -> float:
    torch_generate(model, ids, 8)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch_generate(model, ids, n)
        times.append(time.perf_counter() - started)
    return n / statistics.median(times)


# --- accuracy ------------------------------------------------------------------------------------


def accuracy(generate, tokenizer_decode, encode, val_rows) -> float:
    """Share of rows whose greedy answer (up to 4 tokens, stopping at end of text) starts with the label,
    as the evaluation job's `labels.match: prefix` scores it."""
    correct = 0
    for row in val_rows:
        prompt = TEMPLATE.split(" {label}")[0].format_map(row)
        out = generate(encode(prompt))
        correct += tokenizer_decode(out).strip().lower().startswith(row["label"])
    return correct / len(val_rows)


# --- olive ---------------------------------------------------------------------------------------


def olive_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import olive"], capture_output=True)
    return probe.returncode == 0


def olive(base_dir: Path, adapter_dir: Path) -> dict:
    out = OUT / "olive"
    shutil.rmtree(out, ignore_errors=True)
    olive_cmd = [sys.executable, "-m", "olive"]
    started = time.perf_counter()
    subprocess.run(
        olive_cmd
        + ["auto-opt", "-m", str(base_dir), "-a", str(adapter_dir), "-o", str(out / "opt"), "--device", "cpu"]
        + ["--provider", "CPUExecutionProvider", "--precision", "int4", "--use_model_builder", "--use_ort_genai"]
        + ["--log_level", "3", "--disable_telemetry"],
        check=True,
        cwd=OUT,
    )
    auto_opt = time.perf_counter() - started
    model_dir = next(p.parent for p in (out / "opt").rglob("genai_config.json"))
    started = time.perf_counter()
    subprocess.run(
        olive_cmd
        + ["generate-adapter", "-m", str(model_dir), "-o", str(out / "adapted"), "--adapter_format", "onnx_adapter"]
        + ["--log_level", "3", "--disable_telemetry"],
        check=True,
        cwd=OUT,
    )
    generate_adapter = time.perf_counter() - started
    adapted = next(p.parent for p in (out / "adapted").rglob("genai_config.json"))
    adapter_files = sorted((out / "adapted").rglob("*.onnx_adapter"))
    return {
        "auto_opt_s": round(auto_opt, 1),
        "generate_adapter_s": round(generate_adapter, 1),
        "model_dir": str(adapted),
        "adapter_file": str(adapter_files[0]) if adapter_files else None,
    }


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain", action="store_true", help="train the adapters again")
    parser.add_argument("--val-rows", type=int, default=500, help="val.jsonl rows for the accuracy comparison")
    parser.add_argument("--skip-olive", action="store_true")
    args = parser.parse_args()

    import torch

    from models.model_store import resolve_model

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    OUT.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model(MODEL, store=REPO / "var" / "models").path
    results: dict = {"machine": f"{len(os.sched_getaffinity(0))} CPU cores, torch {torch.__version__}"}

    print("training adapters", flush=True)
    emotion = train("emotion", 2000, 0, base_dir, args.retrain)
    emotion2 = train("emotion2", 120, 3000, base_dir, args.retrain)
    adapters = {"emotion": emotion, "emotion2": emotion2}

    print("exporting", flush=True)
    exports = {}
    all_int4 = {"int8_sensitive_layers": False}
    for name, precision, mode, used, quantization in [
        ("base-fp32", "fp32", None, {}, {}),
        ("base-int4", "int4", None, {}, {}),
        ("merged-int4", "int4", "merged", {"emotion": emotion}, {}),
        ("merged-int4-k_quant-all", "int4", "merged", {"emotion": emotion}, all_int4),
        ("merged-int4-rtn-all", "int4", "merged", {"emotion": emotion}, all_int4 | {"method": "rtn"}),
        ("separate-int4", "int4", "separate", {"emotion": emotion}, {}),
        ("multi-int4", "int4", "multi", adapters, {}),
    ]:
        package, seconds, files = export(name, base_dir, precision, mode, used, **quantization)
        exports[name] = {"package": package, "files": files, "mode": mode, "adapters": used}
        results.setdefault("exports", {})[name] = {"seconds": round(seconds, 1), "bytes": dir_bytes(package)}
        print(f"  {name}: {seconds:.1f} s, {dir_bytes(package) / 1e6:.1f} MB", flush=True)
    results["safetensors_bytes"] = sum(p.stat().st_size for p in base_dir.glob("*.safetensors"))

    print("parity gate", flush=True)
    for name in ("base-int4", "merged-int4", "separate-int4", "multi-int4"):
        e = exports[name]
        results.setdefault("gate", {})[name] = gate(
            e["package"], base_dir, e["mode"], e["adapters"], e["files"], "int4"
        )
        print(f"  {name}: {json.dumps(results['gate'][name]['checks'])}", flush=True)

    print("tokens/s", flush=True)
    tps: dict = {}
    base_model, tokenizer, _ = og_load(exports["base-int4"]["package"])
    ids = [int(t) for t in tokenizer.encode(PROMPT)]
    tps["onnx int4 base"] = og_tokens_per_second(base_model, ids)
    for name in ("merged-int4", "separate-int4"):
        model, _, _ = og_load(exports[name]["package"])
        tps[f"onnx int4 {name.split('-')[0]} (emotion)"] = og_tokens_per_second(model, ids)
        del model
    model, _, og_adapters = og_load(exports["multi-int4"]["package"], exports["multi-int4"]["files"])
    tps["onnx int4 multi (emotion active)"] = og_tokens_per_second(model, ids, og_adapters, "emotion")
    tps["onnx int4 multi (none active)"] = og_tokens_per_second(model, ids)
    del model
    reference = torch_model(base_dir, None)
    tps["pytorch fp32 base"] = torch_tokens_per_second(reference, ids)
    peft_model = torch_model(base_dir, emotion)
    tps["pytorch fp32 + peft (emotion)"] = torch_tokens_per_second(peft_model, ids)
    results["tokens_per_second"] = {k: round(v, 1) for k, v in tps.items()}
    print(json.dumps(results["tokens_per_second"], indent=1), flush=True)

    print(f"accuracy on {args.val_rows} val rows", flush=True)
    val = rows(DATA / "val.jsonl", args.val_rows)
    acc: dict = {}
    started = time.perf_counter()
    acc["pytorch fp32 + peft"] = accuracy(
        lambda i: torch_generate(peft_model, i, 4, stop_at_eos=True),
        tokenizer.decode,
        lambda p: [int(t) for t in tokenizer.encode(p)],
        val,
    )
    acc["pytorch_seconds"] = round(time.perf_counter() - started, 1)
    peft_model = reference = None  # free the PyTorch models
    model, _, _ = og_load(exports["merged-int4"]["package"])
    started = time.perf_counter()
    acc["onnx int4 merged"] = accuracy(
        lambda i: og_generate(model, i, 4, stop_at_eos=True),
        tokenizer.decode,
        lambda p: [int(t) for t in tokenizer.encode(p)],
        val,
    )
    acc["onnx_merged_seconds"] = round(time.perf_counter() - started, 1)
    del model
    for variant in ("k_quant-all", "rtn-all"):
        model, _, _ = og_load(exports[f"merged-int4-{variant}"]["package"])
        acc[f"onnx int4 merged ({variant})"] = accuracy(
            lambda i, model=model: og_generate(model, i, 4, stop_at_eos=True),
            tokenizer.decode,
            lambda p: [int(t) for t in tokenizer.encode(p)],
            val,
        )
        results["tokens_per_second"][f"onnx int4 merged ({variant})"] = round(og_tokens_per_second(model, ids), 1)
        del model
    model, _, og_adapters = og_load(exports["multi-int4"]["package"], exports["multi-int4"]["files"])
    acc["onnx int4 multi (emotion active)"] = accuracy(
        lambda i: og_generate(model, i, 4, og_adapters, "emotion", stop_at_eos=True),
        tokenizer.decode,
        lambda p: [int(t) for t in tokenizer.encode(p)],
        val,
    )
    results["accuracy"] = acc
    print(json.dumps(acc, indent=1), flush=True)

    print("switching", flush=True)
    import onnxruntime_genai as og

    switch_times = []
    for i in range(50):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=64)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.set_active_adapter(og_adapters, "emotion" if i % 2 else "emotion2")
        switch_times.append(time.perf_counter() - started)
    first_token = []
    for i in range(10):
        started = time.perf_counter()
        og_generate(model, ids, 1, og_adapters, "emotion" if i % 2 else "emotion2")
        first_token.append(time.perf_counter() - started)
    load_adapter = []
    for _ in range(3):
        fresh = og.Adapters(model)
        started = time.perf_counter()
        fresh.load(str(exports["multi-int4"]["files"]["emotion"]), "x")
        load_adapter.append(time.perf_counter() - started)
    del model
    load_model, first_merged = [], []
    for _ in range(3):
        started = time.perf_counter()
        merged_model = og.Model(str(exports["merged-int4"]["package"]))
        load_model.append(time.perf_counter() - started)
        started = time.perf_counter()
        og_generate(merged_model, ids, 1)
        first_merged.append(time.perf_counter() - started)
        del merged_model
    results["switching"] = {
        "set_active_adapter_ms": round(1000 * statistics.median(switch_times), 4),
        "first_token_after_switch_ms": round(1000 * statistics.median(first_token), 1),
        "adapters_load_ms": round(1000 * statistics.median(load_adapter), 1),
        "load_merged_model_ms": round(1000 * statistics.median(load_model), 1),
        "first_token_merged_ms": round(1000 * statistics.median(first_merged), 1),
    }
    print(json.dumps(results["switching"], indent=1), flush=True)

    if not args.skip_olive and olive_available():
        print("olive", flush=True)
        try:
            info = olive(base_dir, emotion)
            model, _, olive_adapters = og_load(
                Path(info["model_dir"]), {"emotion": Path(info["adapter_file"])} if info["adapter_file"] else None
            )
            ours, _, our_adapters = og_load(exports["multi-int4"]["package"], exports["multi-int4"]["files"])
            theirs_out = og_generate(model, ids, 32, olive_adapters, "emotion" if olive_adapters else None)
            ours_out = og_generate(ours, ids, 32, our_adapters, "emotion")
            info["loads"] = True
            info["same_32_tokens_as_grove_multi"] = theirs_out == ours_out
            info["matching_tokens_of_32"] = sum(a == b for a, b in zip(theirs_out, ours_out, strict=True))
            info["bytes"] = dir_bytes(Path(info["model_dir"]))
        except Exception as exc:  # recorded, not fatal: the reference may fail where we do not
            info = {"error": f"{exc.__class__.__name__}: {exc}"}
        results["olive"] = info
        print(json.dumps(info, indent=1), flush=True)

    for entry in exports.values():
        entry["package"] = str(entry["package"])
        entry["files"] = {k: str(v) for k, v in entry["files"].items()}
        entry["adapters"] = {k: str(v) for k, v in entry["adapters"].items()}
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()

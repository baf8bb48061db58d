"""Building ONNX models with the onnxruntime-genai model builder, run as a subprocess.

    python -m onnxruntime_genai.models.builder -i DIR -o OUT -p PREC -e EP -c CACHE
        --extra_options hf_token=false [adapter_path=ADAPTER nodes_to_exclude=...] [block_size=..]
        [algo_config=k_quant] [matmul_mixed_precision=mixed_layers:int8]

run as `python -m worker.onnx_builder_compat` with the same arguments, which makes the configs of
transformers 5 readable to the builder (Gemma 3's per-layer-type RoPE parameters).

A subprocess keeps the builder's memory and module state out of the worker and lets a cancel stop it
at once. With `adapter_path` the builder keeps every LoRA pair as its own `.../lora_A/MatMul` and
`.../lora_B/MatMul` (lora_B pre-multiplied by alpha/r). For int4/int8 it would quantize those too,
renaming their initializers to `..._Q4` and losing the small LoRA values, so they are always excluded
from quantization: the base weights are quantized, the LoRA weights stay in the model's io dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jobs.export_spec import FUSED_LORA_MODULES, LORA_MODULES
from models.model_store import load_options

# Files of a Hugging Face model directory that are not weights: carried over to a merged copy.
_NON_WEIGHT_SUFFIXES = (".json", ".jinja", ".model", ".txt")


class BuildFailed(Exception):
    """The builder exited with an error (its output's tail is in the message)."""


class BuildStopped(Exception):
    """The build was interrupted because the job was cancelled or its lease lost."""


@dataclass
class BuildResult:
    command: list[str]
    seconds: float
    log_tail: str


def lora_node_names(num_layers: int, target_modules: list[str]) -> list[str]:
    """Names of the builder's LoRA MatMul nodes for these modules (to keep them out of quantization)."""
    names = []
    modules = set()
    for module in {m.rsplit(".", 1)[-1] for m in target_modules}:
        modules.update(FUSED_LORA_MODULES.get(module, (module,)))
    for layer in range(num_layers):
        for module in sorted(modules):
            block = LORA_MODULES.get(module)
            if block is None:
                continue
            for half in ("A", "B"):
                names.append(f"/model/layers.{layer}/{block}/{module}/lora_{half}/MatMul")
    return names


def num_hidden_layers(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers"))


def build(
    input_dir: Path,
    output_dir: Path,
    precision: str,
    provider: str,
    *,
    cache_dir: Path,
    adapter_dir: Path | None = None,
    exclude_nodes: list[str] | None = None,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    quantization_method: str = "rtn",
    int8_sensitive_layers: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = 0.5,
) -> BuildResult:
    """Run the builder; raise BuildFailed with its output's tail, or BuildStopped when asked to stop."""
    # The builder runs in the output's parent directory: a relative path would mean something else there.
    input_dir, output_dir, cache_dir = input_dir.resolve(), output_dir.resolve(), cache_dir.resolve()
    adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
    extra = ["hf_token=false"]
    if adapter_dir is not None:
        extra.append(f"adapter_path={adapter_dir}")
    if exclude_nodes:
        extra.append("nodes_to_exclude=" + ",".join(exclude_nodes))
    if precision in ("int4", "int8"):
        if block_size is not None:
            extra.append(f"block_size={block_size}")
        if accuracy_level is not None:
            extra.append(f"accuracy_level={accuracy_level}")
        if quantization_method != "rtn":  # the builder's "default" is round-to-nearest
            extra.append(f"algo_config={quantization_method}")
        if precision == "int4" and int8_sensitive_layers:
            extra.append("matmul_mixed_precision=mixed_layers:int8")
    command = [
        sys.executable,
        "-m",
        "worker.onnx_builder_compat",  # the builder, reading transformers 5 configs it predates
        "-i",
        str(input_dir),
        "-o",
        str(output_dir),
        "-p",
        precision,
        "-e",
        provider,
        "-c",
        str(cache_dir),
        "--extra_options",
        *extra,
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir.parent / f"{output_dir.name}-builder.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=output_dir.parent, start_new_session=True
        )
        try:
            while process.poll() is None:
                if should_stop():
                    process.kill()
                    process.wait()
                    raise BuildStopped()
                time.sleep(poll_seconds)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.monotonic() - started
    tail = log_path.read_text(errors="replace")[-3000:]
    log_path.unlink(missing_ok=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    if process.returncode != 0:
        last = [line for line in tail.splitlines() if line.strip()][-8:]
        raise BuildFailed(f"the model builder exited with {process.returncode}: " + " | ".join(last))
    if not (output_dir / "genai_config.json").is_file():
        raise BuildFailed("the model builder wrote no genai_config.json")
    return BuildResult(command=command, seconds=seconds, log_tail=tail)


def merge_adapter(base_dir: Path, adapter_dir: Path, output_dir: Path) -> Path:
    """A copy of the base model with the adapter folded into its weights (peft merge_and_unload)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **load_options(base_dir.name))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output_dir))
    for path in base_dir.iterdir():
        if path.is_file() and path.suffix in _NON_WEIGHT_SUFFIXES and not (output_dir / path.name).exists():
            shutil.copy2(path, output_dir / path.name)
    return output_dir

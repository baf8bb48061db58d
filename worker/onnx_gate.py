"""The parity gate: an exported package must generate what the PyTorch model generates before it is published.

For every check (the model as built; for a multi package the base with no adapter active and then each
adapter activated with `og.Adapters` + `set_active_adapter`, without reloading), and for every prompt:

1. onnxruntime-genai loads the package as a client would and generates `max_new_tokens` greedily,
   keeping the logits it chose each token from;
2. PyTorch (the base model from the store, plus the peft adapter when the check has one) runs once over the
   prompt followed by those same tokens (teacher forcing), giving its logits at the same positions;
3. a position matches when PyTorch's greedy choice there is the token onnxruntime-genai chose.

Recorded per check: the share of matching tokens, the mean and largest absolute logit difference, and a
sample. A check passes when the share is at least `min_token_match` and the mean difference at most
`max_mean_abs_logit_diff` (fp32 defaults to every token matching). The prompts are the same token ids
for both runtimes (encoded by the package's own tokenizer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.model_store import load_options

MAX_PROMPT_TOKENS = 96


class GateStopped(Exception):
    """The gate was interrupted because the job was cancelled or its lease lost."""


@dataclass(frozen=True)
class Check:
    label: str  # "base" or the adapter's name
    onnx_adapter: str | None  # adapter to activate in onnxruntime-genai (multi packages)
    torch_adapter: str | None  # peft adapter to activate in the PyTorch reference; None: the base model


@dataclass
class GateResult:
    passed: bool
    report: dict

    def failures(self) -> list[dict]:
        return [c for c in self.report["checks"] if not c["passed"]]


def _reference_model(base_dir: Path, adapter_dirs: dict[str, Path], device: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **load_options(base_dir.name))
    if adapter_dirs:
        names = list(adapter_dirs)
        model = PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model.to(device).eval()


def _torch_logits(model, token_ids: list[int], n_prompt: int, adapter: str | None, device: str) -> np.ndarray:
    import contextlib

    import torch

    if hasattr(model, "disable_adapter"):
        if adapter is None:
            context = model.disable_adapter()
        else:
            model.set_adapter(adapter)
            context = contextlib.nullcontext()
    else:
        context = contextlib.nullcontext()
    with torch.no_grad(), context:
        logits = model(torch.tensor([token_ids], device=device)).logits[0]
    return logits[n_prompt - 1 : -1].float().cpu().numpy()


def _onnx_generate(model, adapters, prompt: list[int], adapter: str | None, max_new_tokens: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        step = np.asarray(generator.get_logits(), dtype=np.float32)
        logits.append(step.reshape(-1, step.shape[-1])[-1])
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, np.stack(logits) if logits else np.zeros((0, 0), dtype=np.float32)


def run_gate(
    package_dir: Path,
    base_dir: Path,
    checks: list[Check],
    prompts: list[str],
    *,
    adapter_dirs: dict[str, Path] | None = None,
    onnx_adapters: dict[str, Path] | None = None,
    max_new_tokens: int,
    min_token_match: float,
    max_mean_abs_logit_diff: float,
    provider: str = "cpu",
    should_stop: Callable[[], bool] = lambda: False,
) -> GateResult:
    """Run every check on every prompt; the result's report goes into the package manifest."""
    import onnxruntime_genai as og
    import torch

    device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
    model = og.Model(str(package_dir))
    tokenizer = og.Tokenizer(model)
    adapters = None
    if onnx_adapters:
        adapters = og.Adapters(model)
        for name, path in onnx_adapters.items():
            adapters.load(str(path), name)
    encoded = [list(map(int, tokenizer.encode(p)))[-MAX_PROMPT_TOKENS:] for p in prompts]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise ValueError("the gate has no non-empty prompt")
    reference = _reference_model(base_dir, adapter_dirs or {}, device)

    results = []
    for check in checks:
        matches = positions = 0
        abs_sum = 0.0
        abs_max = 0.0
        sample = None
        for ids in encoded:
            if should_stop():
                raise GateStopped()
            tokens, onnx_logits = _onnx_generate(model, adapters, ids, check.onnx_adapter, max_new_tokens)
            if not tokens:
                continue
            torch_logits = _torch_logits(reference, ids + tokens, len(ids), check.torch_adapter, device)
            matches += int((torch_logits.argmax(-1) == np.asarray(tokens)).sum())
            positions += len(tokens)
            diff = np.abs(onnx_logits - torch_logits)
            abs_sum += float(diff.mean(axis=-1).sum())
            abs_max = max(abs_max, float(diff.max()))
            if sample is None:
                sample = {
                    "prompt": tokenizer.decode(np.asarray(ids)),
                    "onnx_output": tokenizer.decode(np.asarray(tokens)),
                }
        token_match = matches / positions if positions else 0.0
        mean_diff = abs_sum / positions if positions else math.inf
        passed = bool(positions) and token_match >= min_token_match and mean_diff <= max_mean_abs_logit_diff
        results.append(
            {
                "check": check.label,
                "adapter": check.onnx_adapter or check.torch_adapter,
                "positions": positions,
                "token_match": round(token_match, 4),
                "mean_abs_logit_diff": _finite(mean_diff),
                "max_abs_logit_diff": _finite(abs_max),
                "passed": passed,
                "sample": sample,
            }
        )
    report = {
        "passed": all(r["passed"] for r in results),
        "prompts": len(encoded),
        "max_new_tokens": max_new_tokens,
        "min_token_match": min_token_match,
        "max_mean_abs_logit_diff": max_mean_abs_logit_diff,
        "reference": f"PyTorch fp32 on {device} (base model + peft adapter), teacher-forced on the ONNX tokens",
        "checks": results,
    }
    del model, adapters, reference
    return GateResult(passed=report["passed"], report=report)


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite difference is recorded as null (and fails the check)."""
    return round(value, 6) if math.isfinite(value) else None

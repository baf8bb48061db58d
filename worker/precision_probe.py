"""How much faster bf16 computes than fp32 on this CPU, measured, for `mixed_precision: auto`.

A CPU's flags say whether it has bf16 instructions (AVX512_BF16, AMX) but not whether PyTorch's kernels gain from
them at a small model's shapes, and torch's own capability string stops at AVX512. So the worker times the
model's largest training matmul (tokens x hidden -> intermediate) in both dtypes, with the threads training will
use: once per model shape and thread count in a worker process, about a tenth of a second. Where bf16 has no
instructions it runs several times slower than fp32, and auto keeps fp32.

The choice is written beside the job's checkpoints (`precision.json`), so a resumed run computes in the precision
it started in, whatever a new measurement on a busier machine would say.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import lru_cache
from pathlib import Path

from jobs.fine_tune_spec import AUTO, FineTuneSpec, resolve_mixed_precision

CHOICE_FILE = "precision.json"
PROBE_TOKENS = 512
PROBE_REPEATS = 5
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=16)
def cpu_bf16_speedup(hidden: int, intermediate: int, threads: int) -> float:
    """fp32 time over bf16 time of a (PROBE_TOKENS x hidden) @ (hidden x intermediate) matmul: the median of
    PROBE_REPEATS timings each, after a warm-up."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(PROBE_TOKENS, hidden, generator=generator).to(dtype)
            b = torch.randn(hidden, intermediate, generator=generator).to(dtype)
            a @ b
            samples = []
            for _ in range(PROBE_REPEATS):
                start = time.perf_counter()
                a @ b
                samples.append(time.perf_counter() - start)
            timings[dtype] = statistics.median(samples)
        return timings[torch.float32] / max(timings[torch.bfloat16], 1e-9)
    finally:
        torch.set_num_threads(previous)


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction sets this CPU's flags list (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def choose_precision(
    spec: FineTuneSpec, config, threads: int, cuda: bool, cuda_bf16: bool, work_dir: Path | None, resuming: bool
) -> tuple[str, str]:
    """(precision, why): the one recorded in work_dir when resuming a run, else resolved now (and recorded)."""
    recorded = _recorded(work_dir, spec) if resuming else None
    if recorded is not None:
        return recorded
    speedup = None
    if not cuda and spec.mixed_precision == AUTO:
        hidden = getattr(config, "hidden_size", 1024)
        speedup = cpu_bf16_speedup(hidden, getattr(config, "intermediate_size", 4 * hidden), threads)
    precision, why = resolve_mixed_precision(spec, cuda, cuda_bf16, speedup)
    if speedup is not None:
        flags = cpu_bf16_flags()
        why += f"; CPU flags: {', '.join(flags)}" if flags else "; the CPU lists no avx512_bf16 or amx_bf16"
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        record = {"requested": spec.mixed_precision, "precision": precision, "reason": why}
        (work_dir / CHOICE_FILE).write_text(json.dumps(record))
    return precision, why


def _recorded(work_dir: Path | None, spec: FineTuneSpec) -> tuple[str, str] | None:
    path = work_dir / CHOICE_FILE if work_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if record.get("requested") != spec.mixed_precision or record.get("precision") not in ("bf16", "fp16", "fp32"):
        return None
    return record["precision"], f"{record.get('reason', '')} (chosen when the run started)"

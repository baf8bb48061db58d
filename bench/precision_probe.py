"""What `mixed_precision: auto` measures on this CPU: bf16 against fp32 matmul time at a model's training shapes
(worker/precision_probe.py, the probe a worker runs at a job's start), at 1 and all threads, and what auto picks.

Usage: make bench-precision [MODEL=smollm2-135m-instruct]   (reads the model's config.json from the store, or
       python bench/precision_probe.py --hidden 576 --intermediate 1536)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.fine_tune_spec import CPU_BF16_MIN_SPEEDUP  # noqa: E402
from models.config import get_settings  # noqa: E402
from worker.precision_probe import cpu_bf16_flags, cpu_bf16_speedup  # noqa: E402

# smollm2-135m-instruct's shapes, for a store that has not prepared it.
DEFAULT_SHAPES = (576, 1536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--repeats", type=int, default=5, help="Probes per thread count (each a median of 5).")
    args = parser.parse_args()
    config_path = get_settings().model_store_dir / args.model / "config.json"
    if args.hidden:
        hidden, intermediate, source = args.hidden, args.intermediate or 4 * args.hidden, "given"
    elif config_path.is_file():
        config = json.loads(config_path.read_text())
        hidden, intermediate, source = config["hidden_size"], config["intermediate_size"], str(config_path)
    else:
        hidden, intermediate, source = *DEFAULT_SHAPES, f"{args.model}'s shapes (not in the store)"
    flags = cpu_bf16_flags() or "none"
    print(f"shapes: 512 x {hidden} @ {hidden} x {intermediate} ({source}); CPU bf16 flags: {flags}")
    print("| threads | bf16 speedup over fp32 (min / median / max of probes) | auto picks |")
    print("|---|---|---|")
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        ratios = []
        for _ in range(args.repeats):
            cpu_bf16_speedup.cache_clear()
            ratios.append(cpu_bf16_speedup(hidden, intermediate, threads))
        ratios.sort()
        median = ratios[len(ratios) // 2]
        pick = "bf16" if median >= CPU_BF16_MIN_SPEEDUP else "fp32"
        print(f"| {threads} | {ratios[0]:.2f}x / {median:.2f}x / {ratios[-1]:.2f}x | {pick} |")


if __name__ == "__main__":
    main()

"""`mixed_precision: auto`: what it resolves to for each device, the CPU measurement behind it, and a resumed run
keeping the precision it started in."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoConfig

from jobs.fine_tune_spec import CPU_BF16_MIN_SPEEDUP, resolve_mixed_precision
from tests.worker.test_train import RecordingHooks, chat_examples, make_spec
from worker.precision_probe import CHOICE_FILE, choose_precision, cpu_bf16_speedup
from worker.train import train_adapter


@pytest.mark.parametrize(
    ("settings", "cuda", "cuda_bf16", "speedup", "expected"),
    [
        ({"mixed_precision": "fp32"}, True, True, None, "fp32"),
        ({"mixed_precision": "bf16"}, False, False, 0.2, "bf16"),
        ({}, True, True, None, "bf16"),
        ({}, True, False, None, "fp32"),
        ({}, False, False, CPU_BF16_MIN_SPEEDUP + 0.5, "bf16"),
        ({}, False, False, CPU_BF16_MIN_SPEEDUP, "bf16"),
        ({}, False, False, CPU_BF16_MIN_SPEEDUP - 0.01, "fp32"),
        ({}, False, False, 0.25, "fp32"),
        ({}, False, False, None, "fp32"),
    ],
)
def test_resolve_mixed_precision(settings, cuda, cuda_bf16, speedup, expected):
    precision, why = resolve_mixed_precision(make_spec(**settings), cuda, cuda_bf16, speedup)
    assert precision == expected
    assert why.startswith("auto") == ("mixed_precision" not in settings)
    if speedup is not None and not settings:
        assert f"{speedup:.2f}x" in why


def test_the_cpu_measurement_is_a_ratio_of_two_real_timings():
    speedup = cpu_bf16_speedup(64, 256, 1)
    assert math.isfinite(speedup) and speedup > 0
    assert cpu_bf16_speedup(64, 256, 1) == speedup  # measured once per shape and thread count


def test_a_resumed_run_keeps_the_recorded_precision_and_a_new_run_measures(tiny_model_dir, tmp_path):
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    spec = make_spec()
    measured, why = choose_precision(spec, config, 1, False, False, tmp_path, resuming=False)
    assert json.loads((tmp_path / CHOICE_FILE).read_text()) == {
        "requested": "auto",
        "precision": measured,
        "reason": why,
    }
    other = "bf16" if measured == "fp32" else "fp32"
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"requested": "auto", "precision": other, "reason": "then"}))
    assert choose_precision(spec, config, 1, False, False, tmp_path, resuming=True) == (
        other,
        "then (chosen when the run started)",
    )
    # Not resuming, or a job that now sets its precision: the record is not used.
    assert choose_precision(spec, config, 1, False, False, tmp_path, resuming=False)[0] == measured
    (tmp_path / CHOICE_FILE).write_text(json.dumps({"requested": "auto", "precision": other, "reason": "then"}))
    assert choose_precision(make_spec(mixed_precision="fp32"), config, 1, False, False, tmp_path, True) == (
        "fp32",
        "set in the job's hyperparameters",
    )


def test_a_default_run_reports_what_auto_chose_and_why(tiny_model_dir, tmp_path):
    hooks = RecordingHooks()
    train_adapter(make_spec(max_steps=1), tiny_model_dir, chat_examples(4), None, tmp_path, hooks)
    stats = hooks.started[1]
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    speedup = cpu_bf16_speedup(config.hidden_size, config.intermediate_size, stats["threads"])
    assert stats["mixed_precision"] == ("bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "fp32")
    assert stats["mixed_precision_reason"].startswith(f"auto: bf16 matmuls at this model's shapes ran {speedup:.2f}x")

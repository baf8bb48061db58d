"""Supervised fine-tuning on a prepared base model: a plain PyTorch loop for lora, qlora, dora and full.

`train_adapter` reads top to bottom as the run goes:
1. the device, threads and precision (worker/train_setup.py);
2. the training and validation examples as token rows (worker/train_data.py);
3. the plan: batch size, epochs, steps, micro-batches, learning rate schedule (worker/train_plan.py);
4. the model (worker/model_setup.py) with its master weights, AdamW and gradient checkpointing
   (worker/train_setup.py), the weights of the latest checkpoint when resuming;
5. the steps, with validation, checkpoints and early stopping (worker/train_loop.py, worker/train_step.py);
6. the result: the best checkpoint's weights, or the last ones.

Validation: at every eval step the loss over a fixed sample of at most VALID_SAMPLE_ROWS validation examples;
at each checkpoint the loss over at most FULL_VALID_MAX_ROWS examples (`full_valid_loss`), which picks the best
checkpoint and drives early stopping.

Checkpoints live in `work_dir/checkpoints/step-N` (worker/checkpoints.py); the last `keep_checkpoints` and the
best are kept. A run whose work_dir holds a checkpoint resumes from the latest one and ends with the same
weights an uninterrupted run would have.

torch, transformers and peft are imported when training starts, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jobs.fine_tune_spec import BASE_LEARNING_RATE, FineTuneSpec
from models.datasets import Example
from worker.checkpoints import checkpoint_dir, checkpoint_steps, copy_weights, save_atomically
from worker.train_data import DataSource, TrainingData, load_training_data
from worker.train_loop import Progress, TrainingLoop
from worker.train_plan import TrainingPlan
from worker.train_setup import TrainedModel, TrainingDevice, pick_training_device

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class TrainingHooks(Protocol):
    def on_start(self, total_steps: int, stats: dict) -> None: ...

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict, kept: list[int]) -> None:
        """A checkpoint was saved at `path`; `kept` lists every checkpoint step still kept (others pruned)."""

    def on_event(self, type: str, message: str, data: dict) -> None: ...

    def should_stop(self) -> bool: ...

    def should_pause(self) -> bool:
        """Asked after every optimizer step but the last: True checkpoints there and ends the run, to resume."""


@dataclass
class TrainOutcome:
    stopped: bool  # True if should_stop() or should_pause() ended training early
    steps: int
    total_steps: int
    trained_tokens: int  # non-padding tokens through the model in training steps
    train_loss: float | None  # at the last logged step
    valid_loss: float | None  # full validation loss at the end (None if stopped or no validation data)
    metrics_rows: list[dict]  # one per logged step, as passed to on_metrics, plus "step"
    adapter_dir: Path  # the result: peft adapter (or full model) + tokenizer; paused: the checkpoint's weights
    checkpoints: list[Path] = field(default_factory=list)  # kept checkpoint directories
    stats: dict = field(default_factory=dict)  # as passed to on_start
    early_stopped: bool = False
    best_step: int | None = None  # checkpoint with the lowest full validation loss
    best_valid_loss: float | None = None
    result_step: int | None = None  # the step whose weights adapter_dir holds
    resumed_from: int | None = None  # checkpoint step this run started from
    paused: bool = False  # should_pause() ended it: its checkpoint at `steps` is where the next run resumes


def train_adapter(
    spec: FineTuneSpec,
    base_dir: Path,
    train_examples: Sequence[Example] | DataSource,
    valid_examples: Sequence[Example] | DataSource | None,
    work_dir: Path,
    hooks: TrainingHooks,
    *,
    init_dir: Path | None = None,
    cache_dir: Path | None = None,
    compile_cache_dir: Path | None = None,
    resume: bool = True,
) -> TrainOutcome:
    """Train, resuming from the latest checkpoint under work_dir if there is one (and `resume`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base_dir, work_dir = Path(base_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)

    saved = checkpoint_steps(work_dir) if resume else []
    device = pick_training_device(spec, base_dir, work_dir, resuming=bool(saved))
    data = load_training_data(spec, base_dir, train_examples, valid_examples, cache_dir)
    plan = TrainingPlan.for_data(spec, data.train, device.cuda)
    model = TrainedModel.build(
        spec,
        base_dir,
        device,
        plan,
        init_dir=init_dir,
        resume_dir=checkpoint_dir(work_dir, saved[-1]) if saved else None,
        compile_cache_dir=compile_cache_dir,
    )
    loop = TrainingLoop(spec, plan, data, model, work_dir, hooks)
    if saved:
        loop.resume(saved[-1])
    stats = _run_stats(spec, device, data, plan, model, loop.resumed_from)
    hooks.on_start(plan.total_steps, stats)
    if saved:
        loop.announce_resume(saved)

    stopped = loop.run()

    progress = loop.progress
    if loop.paused:  # nothing to publish: the weights so far are in the checkpoint it paused at
        adapter_dir, result_step = checkpoint_dir(work_dir, progress.step), progress.step
    else:
        adapter_dir, result_step = _save_result(spec, work_dir, progress, stopped, model, data.tokenizer)
    return TrainOutcome(
        stopped=stopped,
        steps=progress.step,
        total_steps=plan.total_steps,
        trained_tokens=progress.trained_tokens,
        train_loss=progress.train_loss,
        valid_loss=None if stopped else progress.valid_loss,
        metrics_rows=progress.metrics_rows,
        adapter_dir=adapter_dir,
        checkpoints=[checkpoint_dir(work_dir, s) for s in checkpoint_steps(work_dir)],
        stats=stats,
        early_stopped=progress.early_stopped,
        best_step=progress.best_step,
        best_valid_loss=progress.best_loss,
        result_step=result_step,
        resumed_from=loop.resumed_from,
        paused=loop.paused,
    )


def _run_stats(
    spec: FineTuneSpec,
    device: TrainingDevice,
    data: TrainingData,
    plan: TrainingPlan,
    model: TrainedModel,
    resumed_from: int | None,
) -> dict:
    """What on_start reports about the run."""
    cache_hit = data.train_cache_hit
    return {
        **data.train.stats(),
        "batch_size": plan.batch_size,
        "n_epochs": plan.n_epochs,
        "gradient_accumulation_steps": plan.accumulation or "auto",
        "token_budget": None if plan.accumulation else plan.token_budget,
        "learning_rate": plan.learning_rate,
        "learning_rate_multiplier": plan.learning_rate / BASE_LEARNING_RATE,
        "lr_scheduler": spec.lr_scheduler,
        "device": str(device.device),
        "threads": device.threads,
        "mixed_precision": device.precision,
        "mixed_precision_reason": device.precision_reason,
        "dtype": model.dtype(),
        "gradient_checkpointing": model.gradient_checkpointing,
        "compiled_layers": model.compiled_layers,
        "trained_weights_compute_dtype": model.compute_dtype(),
        "estimated_activation_mb": round(model.activation_bytes / 2**20, 1),
        "packing": spec.packing,
        "steps_per_epoch": plan.steps_per_epoch,
        "max_seq_len": spec.max_seq_len,
        "adapter_type": spec.adapter.type,
        "lora_rank": model.setup.rank,
        "trainable_parameters": model.trainable_parameters(),
        "n_valid_examples": data.valid.n_examples,
        "n_valid_rows": len(data.valid.rows),
        "tokenization_cache": None if cache_hit is None else ("hit" if cache_hit else "miss"),
        "tokenize_seconds": round(data.tokenize_seconds, 3),
        "resumed_from_step": resumed_from,
    }


def _save_result(
    spec: FineTuneSpec, work_dir: Path, progress: Progress, stopped: bool, model: TrainedModel, tokenizer
) -> tuple[Path, int]:
    """(adapter_dir, the step whose weights it holds): the best checkpoint's weights if the spec asks for the
    best and a finished run's last step is not it, else the weights as they are."""
    adapter_dir = work_dir / "adapter"
    best = progress.best_step
    if not stopped and spec.result_adapter == "best" and best is not None and best != progress.step:

        def copy_best(tmp: Path) -> None:
            copy_weights(checkpoint_dir(work_dir, best), tmp)
            tokenizer.save_pretrained(str(tmp))

        save_atomically(adapter_dir, copy_best)
        return adapter_dir, best
    save_atomically(adapter_dir, lambda tmp: model.save(tmp, tokenizer))
    return adapter_dir, progress.step

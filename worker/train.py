"""Supervised fine-tuning of a LoRA/DoRA adapter on a prepared base model: a plain PyTorch loop.

One optimizer step takes `batch_size` examples (split into micro-batches by a token budget, gradients
accumulated; the loss is the mean over every trained token of the batch, so micro-batching changes nothing).
AdamW, no weight decay, gradient clipping at 1.0, linear warm-up over the first 3% of steps then linear decay.

Validation: at every eval step (every `eval_every_steps`, else every log step) the loss over a fixed sample
of at most VALID_SAMPLE_ROWS validation examples; at each epoch end and at the last step the loss over at most
FULL_VALID_MAX_ROWS examples (`full_valid_loss`, also reported as `valid_loss` there).

torch, transformers and peft are imported when training starts, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from models.datasets import DatasetError, Example
from models.specs import (
    BASE_LEARNING_RATE,
    FineTuneSpec,
    resolve_batch_size,
    resolve_learning_rate,
    resolve_n_epochs,
)
from worker.data import IGNORE_INDEX, TokenizedData, collate, tokenize_examples

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VALID_SAMPLE_ROWS = 64
FULL_VALID_MAX_ROWS = 1000
WARMUP_FRACTION = 0.03
MAX_GRAD_NORM = 1.0
# Padded tokens per micro-batch: bounds activation and logits memory (vocab-sized rows per trained token).
CPU_TOKEN_BUDGET = 4096
CUDA_TOKEN_BUDGET = 16384
MAX_CHECKPOINTS = 50
STOP_POLL_SECONDS = 1.0  # during evaluation, ask should_stop at most this often


class TrainingHooks(Protocol):
    def on_start(self, total_steps: int, stats: dict) -> None: ...

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class TrainOutcome:
    stopped: bool  # True if should_stop() ended training early
    steps: int
    total_steps: int
    trained_tokens: int  # non-padding tokens through the model in training steps
    train_loss: float | None  # at the last logged step
    valid_loss: float | None  # at the end (None if stopped early or no validation data)
    metrics_rows: list[dict]  # one per logged step, as passed to on_metrics, plus "step"
    adapter_dir: Path  # peft adapter (adapter_model.safetensors, adapter_config.json) + tokenizer
    checkpoints: list[Path] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # as passed to on_start


class _Stopped(Exception):
    pass


def _pick_device():
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _set_threads() -> None:
    import torch

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    torch.set_num_threads(max(1, cpus))


def _lr_factor(step: int, total_steps: int) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (1-based)."""
    warmup = int(total_steps * WARMUP_FRACTION)
    i = step - 1
    if i < warmup:
        return (i + 1) / (warmup + 1)
    return (total_steps - i) / (total_steps - warmup)


def _micro_batches(rows: Sequence[dict], token_budget: int) -> Iterator[list[dict]]:
    """Consecutive chunks whose padded size (rows x longest row) stays within the budget."""
    chunk: list[dict] = []
    longest = 0
    for row in rows:
        n = len(row["input_ids"])
        if chunk and max(longest, n) * (len(chunk) + 1) > token_budget:
            yield chunk
            chunk, longest = [], 0
        chunk.append(row)
        longest = max(longest, n)
    if chunk:
        yield chunk


def _n_targets(rows: Sequence[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)


def _epoch_batches(n_rows: int, batch_size: int, seed: int) -> Iterator[tuple[list[int], bool]]:
    """Endless (row indices, ends an epoch) batches; each epoch is a fresh seeded shuffle."""
    rng = random.Random(seed)
    while True:
        order = list(range(n_rows))
        rng.shuffle(order)
        for start in range(0, n_rows, batch_size):
            yield order[start : start + batch_size], start + batch_size >= n_rows


class _Trainer:
    def __init__(self, model, device, dtype, pad_token_id: int, hooks: TrainingHooks):
        import inspect

        self.model = model
        self.device = device
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.hooks = hooks
        self.token_budget = CUDA_TOKEN_BUDGET if device.type == "cuda" else CPU_TOKEN_BUDGET
        forward = model.get_base_model().forward
        self.keep_logits_arg = "logits_to_keep" in inspect.signature(forward).parameters
        self._last_poll = 0.0

    def _autocast(self):
        import torch

        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def loss_sums(self, rows: list[dict]):
        """(summed token loss tensor, number of correct argmax predictions, non-padding tokens) of a batch."""
        import torch
        import torch.nn.functional as F

        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_token_id).items()}
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
        targets = labels[:, 1:][keep[:, :-1]]
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self.keep_logits_arg else {}
        with self._autocast():
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kwargs
            ).logits
        if logits.ndim == 3:  # the model ignored logits_to_keep, or it was not passed
            logits = logits[keep]
        logits = logits.float()
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = int((logits.detach().argmax(dim=-1) == targets).sum())
        return loss_sum, correct, int(batch["attention_mask"].sum())

    def train_step(self, rows: list[dict]) -> tuple[float, int, int, int]:
        """Forward/backward over micro-batches; returns (summed loss, correct, targets, tokens)."""
        n_targets = _n_targets(rows)
        total_loss, total_correct, total_tokens = 0.0, 0, 0
        for chunk in _micro_batches(rows, self.token_budget):
            loss_sum, correct, tokens = self.loss_sums(chunk)
            (loss_sum / n_targets).backward()
            total_loss += float(loss_sum.detach())
            total_correct += correct
            total_tokens += tokens
        return total_loss, total_correct, n_targets, total_tokens

    def ask_stop(self) -> bool:
        self._last_poll = time.monotonic()
        return bool(self.hooks.should_stop())

    def poll_stop(self) -> None:
        if time.monotonic() - self._last_poll >= STOP_POLL_SECONDS and self.ask_stop():
            raise _Stopped

    def evaluate(self, rows: list[dict]) -> tuple[float, float]:
        """(mean token loss, token accuracy) over rows; raises _Stopped if a stop is asked meanwhile."""
        import torch

        self.model.eval()
        loss, correct, targets = 0.0, 0, 0
        try:
            with torch.no_grad():
                for chunk in _micro_batches(rows, self.token_budget):
                    self.poll_stop()
                    loss_sum, n_correct, _ = self.loss_sums(chunk)
                    loss += float(loss_sum)
                    correct += n_correct
                    targets += _n_targets(chunk)
        finally:
            self.model.train()
        return loss / targets, correct / targets


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (FutureWarning).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _save_dir(model, dest: Path, tokenizer=None) -> Path:
    """Save the adapter (and tokenizer) into a temporary sibling and rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        with _quiet_peft():
            model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _max_lora_rank(base_dir: Path) -> int | None:
    info = base_dir / "grove-model.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("max_lora_rank")


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def train_adapter(
    spec: FineTuneSpec,
    base_dir: Path,
    train_examples: list[Example],
    valid_examples: list[Example] | None,
    work_dir: Path,
    hooks: TrainingHooks,
) -> TrainOutcome:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base_dir, work_dir = Path(base_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # from an earlier attempt of this job
    _set_threads()
    device, dtype = _pick_device()

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True, trust_remote_code=False)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train: TokenizedData = tokenize_examples(train_examples, tokenizer, spec.max_seq_len)
    if not train.rows:
        raise DatasetError(
            f"no training example has a token to train on within max_seq_len={spec.max_seq_len} "
            "(assistant messages all weighted 0, or cut off)",
            param="training_file",
        )
    valid = tokenize_examples(valid_examples or [], tokenizer, spec.max_seq_len)
    # Fixed, seeded validation subsets so that successive valid losses are comparable.
    valid_order = list(range(len(valid.rows)))
    random.Random(spec.seed).shuffle(valid_order)
    valid_sample = [valid.rows[i] for i in sorted(valid_order[:VALID_SAMPLE_ROWS])]
    valid_full = [valid.rows[i] for i in sorted(valid_order[:FULL_VALID_MAX_ROWS])]

    n_rows = len(train.rows)
    batch_size = resolve_batch_size(spec, train.n_examples)
    n_epochs = resolve_n_epochs(spec, train.n_examples)
    learning_rate = resolve_learning_rate(spec)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total_steps = spec.max_steps or n_epochs * steps_per_epoch
    eval_every = spec.eval_every_steps or spec.log_every_steps
    # Checkpoints at epoch ends; at most about MAX_CHECKPOINTS of them when max_steps runs many epochs.
    checkpoint_every = math.ceil(math.ceil(total_steps / steps_per_epoch) / MAX_CHECKPOINTS)

    torch.manual_seed(spec.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=dtype, local_files_only=True, trust_remote_code=False
    ).to(device)
    model.config.use_cache = False
    rank = spec.adapter.r
    max_rank = _max_lora_rank(base_dir)
    if max_rank is not None:
        rank = min(rank, max_rank)
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=spec.adapter.alpha,
        lora_dropout=spec.adapter.dropout,
        target_modules=spec.adapter.target_modules,
        use_dora=spec.adapter.type == "dora",
        bias="none",
    )
    with _quiet_peft():
        model = get_peft_model(model, lora_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)

    stats = {
        **train.stats(),
        "batch_size": batch_size,
        "n_epochs": n_epochs,
        "learning_rate": learning_rate,
        "learning_rate_multiplier": learning_rate / BASE_LEARNING_RATE,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "steps_per_epoch": steps_per_epoch,
        "max_seq_len": spec.max_seq_len,
        "lora_rank": rank,
        "trainable_parameters": sum(p.numel() for p in params),
        "n_valid_examples": valid.n_examples,
        "n_valid_rows": len(valid.rows),
    }
    hooks.on_start(total_steps, stats)

    trainer = _Trainer(model, device, dtype, pad_token_id, hooks)
    checkpoints: list[Path] = []
    metrics_rows: list[dict] = []
    stopped = False
    step = 0
    trained_tokens = 0
    train_loss = valid_loss = None
    # Accumulated since the last logged step.
    acc_loss, acc_correct, acc_targets, acc_tokens, acc_seconds = 0.0, 0, 0, 0, 0.0

    batches = _epoch_batches(n_rows, batch_size, spec.seed)
    try:
        while step < total_steps:
            indices, epoch_end = next(batches)
            step += 1
            started = time.perf_counter()
            lr = learning_rate * _lr_factor(step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, correct, n_targets, n_tokens = trainer.train_step([train.rows[i] for i in indices])
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            acc_seconds += time.perf_counter() - started
            acc_loss += loss_sum
            acc_correct += correct
            acc_targets += n_targets
            acc_tokens += n_tokens
            trained_tokens += n_tokens
            last = step == total_steps
            if not last and trainer.ask_stop():
                stopped = True
                break

            epoch = math.ceil(step / steps_per_epoch)
            checkpoint = epoch_end and (epoch % checkpoint_every == 0 or step == total_steps)
            full_eval = bool(valid_full) and (last or checkpoint)
            sample_eval = bool(valid_sample) and not full_eval and step % eval_every == 0
            metrics = {"train_loss": _round(loss_sum / n_targets), "learning_rate": lr}
            if full_eval or sample_eval or last or step % spec.log_every_steps == 0:
                metrics = {
                    "train_loss": _round(acc_loss / acc_targets),
                    "train_mean_token_accuracy": _round(acc_correct / acc_targets),
                    "valid_loss": None,
                    "learning_rate": lr,
                    "tokens_per_second": _round(acc_tokens / acc_seconds if acc_seconds > 0 else 0.0, 2),
                    "trained_tokens": trained_tokens,
                    "epoch": _round(step / steps_per_epoch, 4),
                }
                train_loss = metrics["train_loss"]
                if full_eval or sample_eval:
                    loss, accuracy = trainer.evaluate(valid_full if full_eval else valid_sample)
                    metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = _round(loss), _round(accuracy)
                    if full_eval:
                        valid_loss = metrics["full_valid_loss"] = metrics["valid_loss"]
                        metrics["full_valid_mean_token_accuracy"] = metrics["valid_mean_token_accuracy"]
                metrics_rows.append({"step": step, **metrics})
                hooks.on_metrics(step, total_steps, metrics)
                acc_loss, acc_correct, acc_targets, acc_tokens, acc_seconds = 0.0, 0, 0, 0, 0.0
            if checkpoint:
                path = _save_dir(model, work_dir / "checkpoints" / f"step-{step}")
                checkpoints.append(path)
                hooks.on_checkpoint(step, path, {"step": step, "epoch": epoch, **metrics})
    except _Stopped:
        stopped = True

    if stopped:
        valid_loss = None
    adapter_dir = _save_dir(model, work_dir / "adapter", tokenizer)
    return TrainOutcome(
        stopped=stopped,
        steps=step,
        total_steps=total_steps,
        trained_tokens=trained_tokens,
        train_loss=train_loss,
        valid_loss=valid_loss,
        metrics_rows=metrics_rows,
        adapter_dir=adapter_dir,
        checkpoints=checkpoints,
        stats=stats,
    )

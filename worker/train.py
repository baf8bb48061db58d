"""Supervised fine-tuning on a prepared base model: a plain PyTorch loop for lora, qlora, dora and full.

One optimizer step takes `batch_size` examples. They are packed into rows of at most max_seq_len tokens
(positions restart per example, a block-diagonal causal mask keeps examples apart) or padded, and split into
micro-batches (gradient_accumulation_steps, or a token budget that fits the device); the loss is the mean
over every trained token of the step, so neither packing nor micro-batching changes the gradient. Logits are
computed only at positions that carry loss (`logits_to_keep`). AdamW, clipping at max_grad_norm, warm-up then
linear, cosine or constant learning rate.

Validation: at every eval step the loss over a fixed sample of at most VALID_SAMPLE_ROWS validation examples;
at each checkpoint (every save_every_steps, each epoch end, the last step) the loss over at most
FULL_VALID_MAX_ROWS examples (`full_valid_loss`), which picks the best checkpoint and drives early stopping.

Checkpoints live in `work_dir/checkpoints/step-N` (weights, optimizer, RNG states, data position, metrics so
far); the last `keep_checkpoints` and the best are kept. A run whose work_dir holds a checkpoint resumes from
the latest one and ends with the same weights an uninterrupted run would have.

The model itself (device, precision, each method's base and peft wrapping) is built in worker/model_setup.py;
checkpoint files are handled by worker/checkpoints.py. torch, transformers and peft are imported when
training starts, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jobs.fine_tune_spec import (
    BASE_LEARNING_RATE,
    FineTuneSpec,
    resolve_batch_size,
    resolve_gradient_accumulation,
    resolve_learning_rate,
    resolve_mixed_precision,
    resolve_n_epochs,
)
from models.datasets import DatasetError, Example
from models.errors import InvalidRequest
from models.model_store import load_options
from worker.checkpoints import (
    STATE_FILE,
    checkpoint_dir,
    checkpoint_steps,
    kept_checkpoints,
    rng_state,
    save_atomically,
    set_rng_state,
)
from worker.data import (
    IGNORE_INDEX,
    TokenizedData,
    collate,
    collate_packed,
    encode_cached,
    finalize,
    pack_rows,
)
from worker.master_weights import TrainedWeights
from worker.model_setup import (
    Setup,
    activation_bytes,
    available_memory,
    build_model,
    compile_decoder_layers,
    forward_accepts,
    load_weights,
    peak_memory_mb,
    pick_device,
    resolve_compile,
    save_weights,
    set_threads,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VALID_SAMPLE_ROWS = 32  # the "small batch" of the per-log-step valid_loss: about 1 % of a step's time each
FULL_VALID_MAX_ROWS = 1000
# Padded tokens per micro-batch when gradient_accumulation_steps is auto: bounds activation memory.
CPU_TOKEN_BUDGET = 4096
CUDA_TOKEN_BUDGET = 16384
# Evaluation keeps no activations, but on CPU smaller micro-batches ran faster (cache-sized): 500 emotion rows
# took 5.3 s in micro-batches of 2,048 tokens against 6.9 s in 4,096 and 10.1 s in one of 16,384.
CPU_EVAL_TOKEN_BUDGET = 2048
MAX_EPOCH_CHECKPOINTS = 50  # epoch-end checkpoints of one run, at most about this many
STOP_POLL_SECONDS = 1.0  # during evaluation, ask should_stop at most this often


class TrainingHooks(Protocol):
    def on_start(self, total_steps: int, stats: dict) -> None: ...

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict, kept: list[int]) -> None:
        """A checkpoint was saved at `path`; `kept` lists every checkpoint step still kept (others pruned)."""

    def on_event(self, type: str, message: str, data: dict) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class DataSource:
    """Examples to train or validate on, loaded only if the tokenization cache misses."""

    load: Callable[[], Sequence[Example]]
    cache_key: str | None = None  # worker.data.cache_key(file sha256, template, tokenizer)


@dataclass
class TrainOutcome:
    stopped: bool  # True if should_stop() ended training early
    steps: int
    total_steps: int
    trained_tokens: int  # non-padding tokens through the model in training steps
    train_loss: float | None  # at the last logged step
    valid_loss: float | None  # full validation loss at the end (None if stopped or no validation data)
    metrics_rows: list[dict]  # one per logged step, as passed to on_metrics, plus "step"
    adapter_dir: Path  # the result: peft adapter (or full model) + tokenizer
    checkpoints: list[Path] = field(default_factory=list)  # kept checkpoint directories
    stats: dict = field(default_factory=dict)  # as passed to on_start
    early_stopped: bool = False
    best_step: int | None = None  # checkpoint with the lowest full validation loss
    best_valid_loss: float | None = None
    result_step: int | None = None  # the step whose weights adapter_dir holds
    resumed_from: int | None = None  # checkpoint step this run started from


class _Stopped(Exception):
    pass


# --- schedule and data order ----------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_ratio: float, kind: str) -> float:
    """Multiplier on the peak learning rate for optimizer step `step` (1-based)."""
    warmup = int(total_steps * warmup_ratio)
    i = step - 1
    if i < warmup:
        return (i + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (i - warmup) / max(1, total_steps - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (total_steps - i) / (total_steps - warmup)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """The batches (row indices) of one epoch: a shuffle seeded by (seed, epoch), so any step's batch can be
    found again after a restart. With `by_length`, rows are sorted by length within chunks of 50 batches and
    the batches shuffled, so a batch holds rows of similar length."""
    rng = random.Random(f"grove-{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if by_length:
        chunk = batch_size * 50
        order = [i for s in range(0, len(order), chunk) for i in sorted(order[s : s + chunk], key=lambda j: lengths[j])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if by_length:
        rng.shuffle(batches)
    return batches


def micro_batches(
    rows: Sequence[dict], packing: bool, capacity: int, accumulation: int | None, token_budget: int
) -> list[list[list[dict]]]:
    """A step's rows as micro-batches of bins (a bin is one sequence of the batch: one row, or several
    packed). `accumulation` micro-batches of about equal example counts, else as few as the budget allows."""
    if accumulation:
        size = math.ceil(len(rows) / accumulation)
        groups = [rows[s : s + size] for s in range(0, len(rows), size)]
        return [pack_rows(g, capacity) if packing else [[r] for r in g] for g in groups]
    bins = pack_rows(rows, capacity) if packing else [[r] for r in rows]
    out: list[list[list[dict]]] = []
    chunk: list[list[dict]] = []
    longest = 0
    for b in bins:
        n = sum(len(r["input_ids"]) for r in b)
        if chunk and max(longest, n) * (len(chunk) + 1) > token_budget:
            out.append(chunk)
            chunk, longest = [], 0
        chunk.append(b)
        longest = max(longest, n)
    if chunk:
        out.append(chunk)
    return out


def _n_targets(rows: Sequence[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


# --- steps and evaluation -------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, setup: Setup, pad_token_id: int, hooks: TrainingHooks):
        self.setup = setup
        self.model = setup.model
        self.device = setup.device
        self.pad_token_id = pad_token_id
        self.hooks = hooks
        self.keep_logits_arg = forward_accepts(setup.model, "logits_to_keep")
        self.eager = getattr(self.model.config, "_attn_implementation", "sdpa") == "eager"
        self._last_poll = 0.0

    def _autocast(self):
        import torch

        if self.setup.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.setup.autocast_dtype)

    def loss_sums(self, bins: list[list[dict]]):
        """(summed token loss, correct argmax predictions, real tokens, padded positions) of a micro-batch."""
        import torch
        import torch.nn.functional as F

        packed = any(len(b) > 1 for b in bins)
        if packed:
            batch = collate_packed(bins, self.pad_token_id)
            n_real = batch.pop("n_real")
            mask = batch["attention_mask"].to(self.device)
            if self.eager:  # eager attention adds the mask to the scores
                dtype = self.model.get_input_embeddings().weight.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(
                    ~mask, torch.finfo(dtype).min
                )
            inputs = {"attention_mask": mask, "position_ids": batch["position_ids"].to(self.device)}
        else:
            batch = collate([b[0] for b in bins], self.pad_token_id)
            n_real = int(batch["attention_mask"].sum())
            inputs = {"attention_mask": batch["attention_mask"].to(self.device)}
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
        targets = labels[:, 1:][keep[:, :-1]]
        if self.keep_logits_arg:
            inputs["logits_to_keep"] = keep
        with self._autocast():
            logits = self.model(input_ids=input_ids, use_cache=False, **inputs).logits
        if logits.ndim == 3:  # the model ignored logits_to_keep, or it was not passed
            logits = logits[keep]
        logits = logits.float()
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        correct = int((logits.detach().argmax(dim=-1) == targets).sum())
        return loss_sum, correct, n_real, input_ids.numel()

    def train_step(self, micro: list[list[list[dict]]], scaler) -> tuple[float, int, int, int, int]:
        """Forward/backward over micro-batches; (summed loss, correct, targets, real tokens, positions)."""
        n_targets = sum(_n_targets(b) for bins in micro for b in bins)
        total_loss, total_correct, total_real, total_positions = 0.0, 0, 0, 0
        for bins in micro:
            loss_sum, correct, n_real, n_positions = self.loss_sums(bins)
            loss = loss_sum / n_targets
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total_loss += float(loss_sum.detach())
            total_correct += correct
            total_real += n_real
            total_positions += n_positions
        return total_loss, total_correct, n_targets, total_real, total_positions

    def ask_stop(self) -> bool:
        self._last_poll = time.monotonic()
        return bool(self.hooks.should_stop())

    def poll_stop(self) -> None:
        if time.monotonic() - self._last_poll >= STOP_POLL_SECONDS and self.ask_stop():
            raise _Stopped

    def evaluate(self, micro: list[list[list[dict]]]) -> tuple[float, float]:
        """(mean token loss, token accuracy); raises _Stopped if a stop is asked meanwhile."""
        import torch

        self.model.eval()
        loss, correct, targets = 0.0, 0, 0
        try:
            # Compiled layers would compile again for no_grad: not worth it for a few evaluation batches.
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for bins in micro:
                    self.poll_stop()
                    loss_sum, n_correct, _, _ = self.loss_sums(bins)
                    loss += float(loss_sum)
                    correct += n_correct
                    targets += sum(_n_targets(b) for b in bins)
        finally:
            self.model.train()
        return loss / targets, correct / targets


# --- the run --------------------------------------------------------------------------------------------


def _encode(source, tokenizer, cache_dir: Path | None, max_seq_len: int) -> tuple[TokenizedData, bool | None]:
    if source is None:
        return finalize([], max_seq_len), None
    if isinstance(source, DataSource):
        encoded, hit = encode_cached(source.load, tokenizer, cache_dir, source.cache_key)
        return finalize(encoded, max_seq_len), hit
    encoded, hit = encode_cached(lambda: source, tokenizer, None, None)
    return finalize(encoded, max_seq_len), None


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
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base_dir, work_dir = Path(base_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_dir), **load_options(spec.model, weights=False))
    threads = set_threads(config)
    device = pick_device()
    cuda = device.type == "cuda"
    precision = resolve_mixed_precision(spec, cuda, cuda and torch.cuda.is_bf16_supported())
    if precision == "fp16" and not cuda:
        raise InvalidRequest("mixed_precision fp16 needs a CUDA device; use bf16 or fp32.", param="mixed_precision")

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), **load_options(spec.model, weights=False))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train, train_cache_hit = _encode(train_examples, tokenizer, cache_dir, spec.max_seq_len)
    if not train.rows:
        raise DatasetError(
            f"no training example has a token to train on within max_seq_len={spec.max_seq_len} "
            "(assistant messages all weighted 0, or cut off)",
            param="training_file",
        )
    valid, _ = _encode(valid_examples, tokenizer, cache_dir, spec.max_seq_len)
    tokenize_seconds = time.perf_counter() - started

    n_rows = len(train.rows)
    lengths = [len(r["input_ids"]) for r in train.rows]
    batch_size = resolve_batch_size(spec, train.n_examples)
    n_epochs = resolve_n_epochs(spec, train.n_examples)
    accumulation = resolve_gradient_accumulation(spec, batch_size)
    learning_rate = resolve_learning_rate(spec)
    steps_per_epoch = math.ceil(n_rows / batch_size)
    total_steps = spec.max_steps or n_epochs * steps_per_epoch
    eval_every = spec.eval_every_steps or spec.log_every_steps
    epoch_checkpoint_every = math.ceil(math.ceil(total_steps / steps_per_epoch) / MAX_EPOCH_CHECKPOINTS)
    token_budget = CUDA_TOKEN_BUDGET if cuda else CPU_TOKEN_BUDGET
    capacity = spec.max_seq_len

    # Fixed, seeded validation subsets so that successive valid losses are comparable.
    valid_order = list(range(len(valid.rows)))
    random.Random(spec.seed).shuffle(valid_order)
    valid_sample = [valid.rows[i] for i in sorted(valid_order[:VALID_SAMPLE_ROWS])]
    valid_full = [valid.rows[i] for i in sorted(valid_order[:FULL_VALID_MAX_ROWS])]

    def eval_batches(rows: list[dict]) -> list[list[list[dict]]]:
        return micro_batches(rows, spec.packing, capacity, None, token_budget if cuda else CPU_EVAL_TOKEN_BUDGET)

    valid_sample_micro, valid_full_micro = eval_batches(valid_sample), eval_batches(valid_full)

    # Gradient checkpointing when the activations of the largest micro-batch would not fit.
    micro_tokens = (
        math.ceil(batch_size / accumulation) * spec.max_seq_len
        if accumulation
        else min(token_budget, batch_size * spec.max_seq_len)
    )
    activations = activation_bytes(config, micro_tokens, 4 if precision == "fp32" else 2)
    if spec.gradient_checkpointing == "auto":
        checkpointing = activations > 0.5 * available_memory(device)
    else:
        checkpointing = bool(spec.gradient_checkpointing)

    torch.manual_seed(spec.seed)
    if cuda:
        torch.cuda.manual_seed_all(spec.seed)
    setup = build_model(spec, base_dir, device, precision, checkpointing, init_dir)
    model = setup.model
    saved = checkpoint_steps(work_dir) if resume else []
    if saved:  # the weights first, in fp32, so that master weights start from them exactly
        load_weights(setup, checkpoint_dir(work_dir, saved[-1]))
    weights = TrainedWeights([p for p in model.parameters() if p.requires_grad], setup.trained_compute_dtype)
    params = weights.master
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # One fused kernel over every tensor instead of a loop of small ops (about 9 ms a step on CPU otherwise).
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, fused=all(p.dtype.is_floating_point for p in params))
    compiled_layers = 0
    if resolve_compile(spec, device, total_steps, checkpointing):
        compiled_layers = compile_decoder_layers(model, compile_cache_dir)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    step = 0
    trained_tokens = 0
    metrics_rows: list[dict] = []
    train_loss = valid_loss = None
    best_step: int | None = None
    best_loss: float | None = None
    bad_checkpoints = 0
    early_stopped = False
    # Accumulated since the last logged step.
    acc = {"loss": 0.0, "correct": 0, "targets": 0, "tokens": 0, "positions": 0, "seconds": 0.0}
    resumed_from = None
    if saved:
        resumed_from = saved[-1]
        path = checkpoint_dir(work_dir, resumed_from)
        state = torch.load(path / STATE_FILE, map_location=device, weights_only=False)
        if state.get("total_steps") != total_steps or state.get("n_rows") != n_rows:
            raise RuntimeError(f"checkpoint {path} was written for another schedule or data; refusing to resume")
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = state["step"]
        trained_tokens = state["trained_tokens"]
        metrics_rows = state["metrics_rows"]
        train_loss, valid_loss = state["train_loss"], state["valid_loss"]
        best_step, best_loss = state["best_step"], state["best_loss"]
        bad_checkpoints = state["bad_checkpoints"]
        early_stopped = state["early_stopped"]
        acc = state["acc"]

    stats = {
        **train.stats(),
        "batch_size": batch_size,
        "n_epochs": n_epochs,
        "gradient_accumulation_steps": accumulation or "auto",
        "token_budget": None if accumulation else token_budget,
        "learning_rate": learning_rate,
        "learning_rate_multiplier": learning_rate / BASE_LEARNING_RATE,
        "lr_scheduler": spec.lr_scheduler,
        "device": str(device),
        "threads": threads,
        "mixed_precision": precision,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "gradient_checkpointing": checkpointing,
        "compiled_layers": compiled_layers,
        "trained_weights_compute_dtype": str(weights.params[0].dtype).removeprefix("torch.") if params else None,
        "estimated_activation_mb": round(activations / 2**20, 1),
        "packing": spec.packing,
        "steps_per_epoch": steps_per_epoch,
        "max_seq_len": spec.max_seq_len,
        "adapter_type": spec.adapter.type,
        "lora_rank": setup.rank,
        "trainable_parameters": sum(p.numel() for p in params),
        "n_valid_examples": valid.n_examples,
        "n_valid_rows": len(valid.rows),
        "tokenization_cache": None if train_cache_hit is None else ("hit" if train_cache_hit else "miss"),
        "tokenize_seconds": round(tokenize_seconds, 3),
        "resumed_from_step": resumed_from,
    }
    hooks.on_start(total_steps, stats)
    if resumed_from is not None:
        hooks.on_event(
            "info",
            f"Resumed from the checkpoint at step {resumed_from} (weights, optimizer, RNG and data position).",
            {"step": resumed_from},
        )
        # The checkpoint may have been saved but not yet published when the previous worker died.
        hooks.on_checkpoint(
            resumed_from,
            checkpoint_dir(work_dir, resumed_from),
            metrics_rows[-1] if metrics_rows and metrics_rows[-1]["step"] == resumed_from else {"step": resumed_from},
            saved,
        )

    trainer = _Trainer(setup, pad_token_id, hooks)
    stopped = False
    loop_started, loop_first_step = time.perf_counter(), step
    epoch_cache: dict[int, list[list[int]]] = {}

    def batch_for(step_number: int) -> tuple[list[int], bool, int]:
        epoch = (step_number - 1) // steps_per_epoch
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, batch_size, spec.seed, epoch, spec.group_by_length)
        index = (step_number - 1) % steps_per_epoch
        return epoch_cache[epoch][index], index == steps_per_epoch - 1, epoch + 1

    def save_checkpoint(at: int, kept: list[int]) -> Path:
        def write(tmp: Path) -> None:
            with weights.full_precision():
                save_weights(setup, tmp)
            state = {
                "step": at,
                "total_steps": total_steps,
                "n_rows": n_rows,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "trained_tokens": trained_tokens,
                "metrics_rows": metrics_rows,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "best_step": best_step,
                "best_loss": best_loss,
                "bad_checkpoints": bad_checkpoints,
                "early_stopped": early_stopped,
                "acc": acc,
                "data_position": {"epoch": (at - 1) // steps_per_epoch + 1, "batch": (at - 1) % steps_per_epoch + 1},
            }
            torch.save(state, tmp / STATE_FILE)

        path = save_atomically(checkpoint_dir(work_dir, at), write)
        for old in checkpoint_steps(work_dir):
            if old not in kept:
                shutil.rmtree(checkpoint_dir(work_dir, old), ignore_errors=True)
        return path

    try:
        while step < total_steps and not early_stopped:
            step += 1
            indices, epoch_end, epoch = batch_for(step)
            step_started = time.perf_counter()
            lr = learning_rate * lr_factor(step, total_steps, spec.warmup_ratio, spec.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = micro_batches([train.rows[i] for i in indices], spec.packing, capacity, accumulation, token_budget)
            loss_sum, correct, n_targets, n_real, n_positions = trainer.train_step(micro, scaler)
            weights.grads_to_master()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if spec.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            weights.master_to_model()
            if cuda:
                torch.cuda.synchronize()
            acc["seconds"] += time.perf_counter() - step_started
            acc["loss"] += loss_sum
            acc["correct"] += correct
            acc["targets"] += n_targets
            acc["tokens"] += n_real
            acc["positions"] += n_positions
            trained_tokens += n_real
            last = step == total_steps
            if not last and trainer.ask_stop():
                stopped = True
                break

            checkpoint = (
                last
                or (spec.save_every_steps is not None and step % spec.save_every_steps == 0)
                or (epoch_end and epoch % epoch_checkpoint_every == 0)
            )
            full_eval = bool(valid_full) and checkpoint
            sample_eval = bool(valid_sample) and not full_eval and step % eval_every == 0
            metrics: dict[str, Any] = {"train_loss": _round(loss_sum / n_targets), "learning_rate": lr}
            if full_eval or sample_eval or last or checkpoint or step % spec.log_every_steps == 0:
                done_here = step - loop_first_step
                elapsed = time.perf_counter() - loop_started
                metrics = {
                    "train_loss": _round(acc["loss"] / acc["targets"]),
                    "train_mean_token_accuracy": _round(acc["correct"] / acc["targets"]),
                    "valid_loss": None,
                    "learning_rate": lr,
                    "tokens_per_second": _round(acc["tokens"] / acc["seconds"] if acc["seconds"] > 0 else 0.0, 2),
                    "trained_tokens": trained_tokens,
                    "epoch": _round(step / steps_per_epoch, 4),
                    "padding_fraction": _round(1 - acc["tokens"] / acc["positions"], 4) if acc["positions"] else 0.0,
                    "peak_memory_mb": peak_memory_mb(device),
                }
                train_loss = metrics["train_loss"]
                if full_eval or sample_eval:
                    loss, accuracy = trainer.evaluate(valid_full_micro if full_eval else valid_sample_micro)
                    metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = _round(loss), _round(accuracy)
                    if full_eval:
                        valid_loss = metrics["full_valid_loss"] = metrics["valid_loss"]
                        metrics["full_valid_mean_token_accuracy"] = metrics["valid_mean_token_accuracy"]
                elapsed = time.perf_counter() - loop_started
                metrics["eta_seconds"] = _round(elapsed / done_here * (total_steps - step), 1) if done_here else None
                metrics_rows.append({"step": step, **metrics})
                hooks.on_metrics(step, total_steps, metrics)
                acc = {"loss": 0.0, "correct": 0, "targets": 0, "tokens": 0, "positions": 0, "seconds": 0.0}
            if checkpoint:
                if full_eval:
                    loss = metrics["full_valid_loss"]
                    if best_loss is None or loss < best_loss - spec.early_stopping_threshold:
                        best_step, best_loss, bad_checkpoints = step, loss, 0
                    else:
                        bad_checkpoints += 1
                        patience = spec.early_stopping_patience
                        if patience is not None and bad_checkpoints >= patience and not last:
                            early_stopped = True
                kept = kept_checkpoints(checkpoint_steps(work_dir), step, best_step, spec.keep_checkpoints)
                path = save_checkpoint(step, kept)
                hooks.on_checkpoint(
                    step,
                    path,
                    {"step": step, "epoch": epoch, **metrics, "is_best": best_step == step},
                    kept,
                )
                if early_stopped:
                    hooks.on_event(
                        "info",
                        f"Early stopping at step {step}: the validation loss has not improved for "
                        f"{bad_checkpoints} checkpoints (best {best_loss:.4f} at step {best_step}).",
                        {"step": step, "best_step": best_step, "best_valid_loss": best_loss},
                    )
    except _Stopped:
        stopped = True

    if stopped:
        valid_loss = None
    result_step = step
    adapter_dir = work_dir / "adapter"
    if not stopped and spec.result_adapter == "best" and best_step is not None and best_step != step:
        best_dir = checkpoint_dir(work_dir, best_step)

        def copy_best(tmp: Path) -> None:
            for item in best_dir.iterdir():
                if item.is_file() and item.name != STATE_FILE:
                    shutil.copy2(item, tmp / item.name)
            tokenizer.save_pretrained(str(tmp))

        save_atomically(adapter_dir, copy_best)
        result_step = best_step
    else:
        with weights.full_precision():
            save_atomically(adapter_dir, lambda tmp: save_weights(setup, tmp, tokenizer))
    return TrainOutcome(
        stopped=stopped,
        steps=step,
        total_steps=total_steps,
        trained_tokens=trained_tokens,
        train_loss=train_loss,
        valid_loss=valid_loss,
        metrics_rows=metrics_rows,
        adapter_dir=adapter_dir,
        checkpoints=[checkpoint_dir(work_dir, s) for s in checkpoint_steps(work_dir)],
        stats=stats,
        early_stopped=early_stopped,
        best_step=best_step,
        best_valid_loss=best_loss,
        result_step=result_step,
        resumed_from=resumed_from,
    )

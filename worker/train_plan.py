"""How a run is laid out before its first step, from the spec and the tokenized data: batch size, epochs and
total steps; which rows each step trains on; how a step's rows form micro-batches; each step's learning rate;
and the steps that checkpoint.

One optimizer step takes `batch_size` examples. They are packed into rows of at most max_seq_len tokens
(positions restart per example) or padded, and split into micro-batches: gradient_accumulation_steps of them,
or as few as a token budget that fits the device allows. The learning rate warms up, then decays linearly or
along a cosine to 0, or stays constant.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.fine_tune_spec import (
    FineTuneSpec,
    resolve_batch_size,
    resolve_gradient_accumulation,
    resolve_learning_rate,
    resolve_n_epochs,
)
from worker.data import TokenizedData, pack_rows

# Padded tokens per micro-batch when gradient_accumulation_steps is auto: bounds activation memory.
CPU_TOKEN_BUDGET = 4096
CUDA_TOKEN_BUDGET = 16384
# Evaluation keeps no activations, but on CPU smaller micro-batches ran faster (cache-sized): 500 emotion rows
# took 5.3 s in micro-batches of 2,048 tokens against 6.9 s in 4,096 and 10.1 s in one of 16,384.
CPU_EVAL_TOKEN_BUDGET = 2048
MAX_EPOCH_CHECKPOINTS = 50  # epoch-end checkpoints of one run, at most about this many


# Not transformers.get_scheduler: its warm-up starts at 0 (step / warmup), a step without any update, where
# this one starts at 1 / (warmup + 1); after the warm-up both give the same factors.
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


@dataclass(frozen=True)
class TrainingPlan:
    spec: FineTuneSpec
    n_rows: int  # training rows (examples left after tokenization)
    batch_size: int
    n_epochs: int
    accumulation: int | None  # micro-batches per step; None: as many as the token budget needs
    learning_rate: float  # the peak
    steps_per_epoch: int
    total_steps: int
    token_budget: int  # padded tokens per training micro-batch
    eval_token_budget: int

    @classmethod
    def for_data(cls, spec: FineTuneSpec, train: TokenizedData, cuda: bool) -> TrainingPlan:
        batch_size = resolve_batch_size(spec, train.n_examples)
        n_epochs = resolve_n_epochs(spec, train.n_examples)
        steps_per_epoch = math.ceil(len(train.rows) / batch_size)
        # A DPO row is a pair: two padded sequences through the model (twice: policy and reference).
        per_row = 2 if spec.dpo is not None else 1
        return cls(
            spec=spec,
            n_rows=len(train.rows),
            batch_size=batch_size,
            n_epochs=n_epochs,
            accumulation=resolve_gradient_accumulation(spec, batch_size),
            learning_rate=resolve_learning_rate(spec),
            steps_per_epoch=steps_per_epoch,
            total_steps=spec.max_steps or n_epochs * steps_per_epoch,
            token_budget=(CUDA_TOKEN_BUDGET if cuda else CPU_TOKEN_BUDGET) // per_row,
            eval_token_budget=(CUDA_TOKEN_BUDGET if cuda else CPU_EVAL_TOKEN_BUDGET) // per_row,
        )

    @property
    def packing(self) -> bool:
        """DPO sums log-probabilities per sequence, over padded rows: its pairs are never packed."""
        return self.spec.packing and self.spec.dpo is None

    def learning_rate_at(self, step: int) -> float:
        return self.learning_rate * lr_factor(step, self.total_steps, self.spec.warmup_ratio, self.spec.lr_scheduler)

    def train_micro_batches(self, rows: Sequence[dict]) -> list[list[list[dict]]]:
        return micro_batches(rows, self.packing, self.spec.max_seq_len, self.accumulation, self.token_budget)

    def eval_micro_batches(self, rows: Sequence[dict]) -> list[list[list[dict]]]:
        return micro_batches(rows, self.packing, self.spec.max_seq_len, None, self.eval_token_budget)

    def largest_micro_batch_tokens(self) -> int:
        per_row = 2 if self.spec.dpo is not None else 1
        if self.accumulation:
            return math.ceil(self.batch_size / self.accumulation) * self.spec.max_seq_len * per_row
        return min(self.token_budget, self.batch_size * self.spec.max_seq_len) * per_row

    def is_checkpoint(self, step: int, epoch: int, epoch_end: bool) -> bool:
        """Every save_every_steps, at the end of every epoch_checkpoint_every-th epoch, and at the last step."""
        every = self.spec.save_every_steps
        epoch_checkpoint_every = math.ceil(math.ceil(self.total_steps / self.steps_per_epoch) / MAX_EPOCH_CHECKPOINTS)
        return (
            step == self.total_steps
            or (every is not None and step % every == 0)
            or (epoch_end and epoch % epoch_checkpoint_every == 0)
        )

    def is_eval_step(self, step: int) -> bool:
        """A step at which the validation sample is evaluated (unless a full evaluation is due)."""
        return step % (self.spec.eval_every_steps or self.spec.log_every_steps) == 0

    def data_position(self, step: int) -> dict:
        return {"epoch": (step - 1) // self.steps_per_epoch + 1, "batch": (step - 1) % self.steps_per_epoch + 1}


class BatchOrder:
    """The rows each step trains on, epoch after epoch; one epoch's order is held at a time."""

    def __init__(self, plan: TrainingPlan, lengths: Sequence[int]):
        self.plan = plan
        self.lengths = lengths
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    def batch_for(self, step: int) -> tuple[list[int], int, bool]:
        """(row indices, epoch (1-based), whether the step ends its epoch) of optimizer step `step` (1-based)."""
        plan = self.plan
        epoch = (step - 1) // plan.steps_per_epoch
        if epoch != self._epoch:
            self._epoch = epoch
            self._batches = epoch_batches(
                self.lengths, plan.batch_size, plan.spec.seed, epoch, plan.spec.group_by_length
            )
        index = (step - 1) % plan.steps_per_epoch
        return self._batches[index], epoch + 1, index == plan.steps_per_epoch - 1

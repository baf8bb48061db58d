"""The forward and backward passes of one optimizer step, and the validation loss.

The loss is the mean over every trained token of the step, so neither packing nor micro-batching changes the
gradient. Logits are computed only at positions that carry loss (`logits_to_keep`). Packed micro-batches get
the block-diagonal causal mask of worker.data.collate_packed, made additive for eager attention.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from worker.data import IGNORE_INDEX, collate, collate_packed
from worker.model_setup import Setup, forward_accepts

if TYPE_CHECKING:
    from worker.train import TrainingHooks

STOP_POLL_SECONDS = 1.0  # during evaluation, ask should_stop at most this often


class Stopped(Exception):
    """should_stop() answered True."""


def n_targets(rows: Sequence[dict]) -> int:
    return sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)


class Trainer:
    """Runs the model over micro-batches: a step's forward and backward passes, and evaluation."""

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
        step_targets = sum(n_targets(b) for bins in micro for b in bins)
        total_loss, total_correct, total_real, total_positions = 0.0, 0, 0, 0
        for bins in micro:
            loss_sum, correct, n_real, n_positions = self.loss_sums(bins)
            loss = loss_sum / step_targets
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total_loss += float(loss_sum.detach())
            total_correct += correct
            total_real += n_real
            total_positions += n_positions
        return total_loss, total_correct, step_targets, total_real, total_positions

    def take_sums(self) -> dict:
        """Sums of the steps since the last call that the loop adds to its own (DPO's rewards; none here)."""
        return {}

    def train_metrics(self, acc: dict) -> dict:
        """The metrics of the logged steps besides the loss, from the loop's sums."""
        return {"train_mean_token_accuracy": round(acc["correct"] / acc["targets"], 6)}

    def ask_stop(self) -> bool:
        self._last_poll = time.monotonic()
        return bool(self.hooks.should_stop())

    def poll_stop(self) -> None:
        if time.monotonic() - self._last_poll >= STOP_POLL_SECONDS and self.ask_stop():
            raise Stopped

    def evaluate(self, micro: list[list[list[dict]]]) -> tuple[float, dict]:
        """(mean token loss, {"mean_token_accuracy": ...}); raises Stopped if a stop is asked meanwhile."""
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
                    targets += sum(n_targets(b) for b in bins)
        finally:
            self.model.train()
        return loss / targets, {"mean_token_accuracy": round(correct / targets, 6)}

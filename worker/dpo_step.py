"""DPO's forward and backward passes: the step of a dpo job, in place of worker.train_step's supervised loss.

A row is a preference pair (worker.data.finalize_pairs). The preferred and non-preferred sequences of a
micro-batch go through the model together, padded, and each sequence's log-probability is the sum over its
reply tokens. The reference log-probabilities come from the same model with the adapter switched off (peft's
`disable_adapter`, no gradient): the reference is the base model, with no second copy of it in memory.

The loss of a pair is the sigmoid DPO loss, -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); a step's
loss is the mean over its pairs, so micro-batching does not change the gradient. The implicit rewards are
beta * (pi - ref) of each reply; a pair counts as correct when the preferred reply's reward is the higher
(TRL's rewards/accuracies).
"""

from __future__ import annotations

from worker.data import IGNORE_INDEX, collate
from worker.train_step import Trainer

REWARD_SUMS = ("reward_chosen", "reward_rejected")


def reward_metrics(prefix: str, sums: dict, n_pairs: int) -> dict:
    """TRL's names for the mean rewards of `n_pairs` pairs: rewards/chosen, rejected, margins, accuracies."""
    if not n_pairs:
        return {}
    chosen, rejected = sums.get("reward_chosen", 0.0) / n_pairs, sums.get("reward_rejected", 0.0) / n_pairs
    return {
        f"{prefix}rewards/chosen": round(chosen, 6),
        f"{prefix}rewards/rejected": round(rejected, 6),
        f"{prefix}rewards/margins": round(chosen - rejected, 6),
        f"{prefix}rewards/accuracies": round(sums.get("correct", 0) / n_pairs, 6),
    }


class DpoTrainer(Trainer):
    def __init__(self, setup, pad_token_id: int, hooks, beta: float):
        super().__init__(setup, pad_token_id, hooks)
        self.beta = beta
        self.sums = dict.fromkeys(REWARD_SUMS, 0.0)

    def sequence_logps(self, rows: list[dict]):
        """The summed log-probability of each row's labelled tokens (a 1-D float32 tensor)."""
        import torch
        import torch.nn.functional as F

        batch = collate(rows, self.pad_token_id)
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
        targets = labels[:, 1:][keep[:, :-1]]
        inputs = {"attention_mask": batch["attention_mask"].to(self.device)}
        if self.keep_logits_arg:
            inputs["logits_to_keep"] = keep
        with self._autocast():
            logits = self.model(input_ids=input_ids, use_cache=False, **inputs).logits
        if logits.ndim == 3:
            logits = logits[keep]
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
        rows_of_tokens = keep.nonzero()[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float32, device=self.device)
        return sums.index_add(0, rows_of_tokens, token_logps)

    def pair_losses(self, pairs: list[dict]):
        """(per-pair DPO losses, chosen rewards, rejected rewards), the rewards without gradient."""
        import torch
        import torch.nn.functional as F

        sequences = [*pairs, *(pair["rejected"] for pair in pairs)]
        policy = self.sequence_logps(sequences)
        with torch.no_grad(), self.model.disable_adapter():
            reference = self.sequence_logps(sequences)
        n = len(pairs)
        chosen_logratio = policy[:n] - reference[:n]
        rejected_logratio = policy[n:] - reference[n:]
        losses = -F.logsigmoid(self.beta * (chosen_logratio - rejected_logratio))
        return losses, self.beta * chosen_logratio.detach(), self.beta * rejected_logratio.detach()

    @staticmethod
    def _tokens(pairs: list[dict]) -> tuple[int, int]:
        """(real tokens, padded positions) of a micro-batch's two padded sequences per pair."""
        lengths = [len(row["input_ids"]) for pair in pairs for row in (pair, pair["rejected"])]
        return sum(lengths), max(lengths) * len(lengths)

    def train_step(self, micro: list[list[list[dict]]], scaler) -> tuple[float, int, int, int, int]:
        """Forward/backward over micro-batches of pairs; (summed pair loss, pairs ranked right, pairs, real
        tokens, positions)."""
        step_pairs = sum(len(bins) for bins in micro)
        total_loss, total_correct, total_real, total_positions = 0.0, 0, 0, 0
        for bins in micro:
            pairs = [b[0] for b in bins]
            losses, chosen, rejected = self.pair_losses(pairs)
            loss = losses.sum() / step_pairs
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total_loss += float(losses.detach().sum())
            total_correct += int((chosen > rejected).sum())
            self.sums["reward_chosen"] += float(chosen.sum())
            self.sums["reward_rejected"] += float(rejected.sum())
            real, positions = self._tokens(pairs)
            total_real += real
            total_positions += positions
        return total_loss, total_correct, step_pairs, total_real, total_positions

    def take_sums(self) -> dict:
        sums, self.sums = self.sums, dict.fromkeys(REWARD_SUMS, 0.0)
        return sums

    def train_metrics(self, acc: dict) -> dict:
        return reward_metrics("", acc, acc["targets"])

    def evaluate(self, micro: list[list[list[dict]]]) -> tuple[float, dict]:
        """(mean pair loss, valid reward metrics); raises Stopped if a stop is asked meanwhile."""
        import torch

        self.model.eval()
        loss, sums, n_pairs = 0.0, {"reward_chosen": 0.0, "reward_rejected": 0.0, "correct": 0}, 0
        try:
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                for bins in micro:
                    self.poll_stop()
                    losses, chosen, rejected = self.pair_losses([b[0] for b in bins])
                    loss += float(losses.sum())
                    sums["reward_chosen"] += float(chosen.sum())
                    sums["reward_rejected"] += float(rejected.sum())
                    sums["correct"] += int((chosen > rejected).sum())
                    n_pairs += len(bins)
        finally:
            self.model.train()
        return loss / n_pairs, reward_metrics("", sums, n_pairs)

"""The optimizer steps of a run, from the first (or the one after the checkpoint it resumes from) to the last.

Each step trains on its batch (worker.train_step) and updates the weights (worker.train_setup). At log steps
the metrics since the last log are reported, with the loss over the validation sample at eval steps. At
checkpoints (every save_every_steps, epoch ends, the last step) the loss over the full validation subset picks
the best step and drives early stopping, and the weights, optimizer, RNG states and `Progress` are saved.
Resuming restores all of these, so the run ends with the weights an uninterrupted one would have.

A pause (hooks.should_pause, asked once a step is wholly done: trained, logged, checkpointed) saves the same state
as a pause checkpoint (worker.checkpoints.PAUSE_MARKER) unless that step already has a regular one, and ends the
run; the next run resumes from it as from any checkpoint. Pausing only between optimizer steps means no gradient
accumulation is ever cut in two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.fine_tune_spec import FineTuneSpec
from worker.checkpoints import (
    checkpoint_dir,
    checkpoint_steps,
    is_pause_checkpoint,
    kept_checkpoints,
    read_state,
    regular_checkpoint_steps,
    rng_state,
    save_checkpoint,
    save_pause_checkpoint,
    set_rng_state,
    write_state,
)
from worker.dpo_step import DpoTrainer
from worker.model_setup import peak_memory_mb
from worker.train_data import TrainingData
from worker.train_plan import BatchOrder, TrainingPlan
from worker.train_setup import TrainedModel
from worker.train_step import Stopped, Trainer

if TYPE_CHECKING:
    from worker.train import TrainingHooks


def _no_sums() -> dict:
    # reward_*: DPO's summed implicit rewards (worker/dpo_step.py); 0 in a supervised run.
    return {
        "loss": 0.0,
        "correct": 0,
        "targets": 0,
        "tokens": 0,
        "positions": 0,
        "seconds": 0.0,
        "reward_chosen": 0.0,
        "reward_rejected": 0.0,
    }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint (its fields are keys of the checkpoint's state)."""

    step: int = 0
    trained_tokens: int = 0  # non-padding tokens through the model in training steps
    metrics_rows: list[dict] = field(default_factory=list)  # one per logged step, as passed to on_metrics
    train_loss: float | None = None  # at the last logged step
    valid_loss: float | None = None  # at the last full validation
    best_step: int | None = None  # checkpoint with the lowest full validation loss
    best_loss: float | None = None
    bad_checkpoints: int = 0  # checkpoints since the best one
    early_stopped: bool = False
    acc: dict = field(default_factory=_no_sums)  # summed over the steps since the last logged one

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(**{f.name: state[f.name] for f in fields(cls)})

    def as_state(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TrainingLoop:
    def __init__(
        self,
        spec: FineTuneSpec,
        plan: TrainingPlan,
        data: TrainingData,
        model: TrainedModel,
        work_dir: Path,
        hooks: TrainingHooks,
    ):
        self.spec, self.plan, self.data, self.model = spec, plan, data, model
        self.work_dir = work_dir
        self.hooks = hooks
        self.progress = Progress()
        self.resumed_from: int | None = None
        self.paused = False  # the run ended at a pause, its state saved for the next run
        if spec.dpo is not None:
            self.trainer: Trainer = DpoTrainer(model.setup, data.pad_token_id, hooks, spec.dpo.beta)
        else:
            self.trainer = Trainer(model.setup, data.pad_token_id, hooks)
        self.order = BatchOrder(plan, [len(r["input_ids"]) for r in data.train.rows])
        valid_sample, valid_full = data.validation_rows(spec.seed)
        self.valid_sample = plan.eval_micro_batches(valid_sample)
        self.valid_full = plan.eval_micro_batches(valid_full)
        self._started = 0.0
        self._first_step = 0

    # --- resuming ---------------------------------------------------------------------------------------

    def resume(self, step: int) -> None:
        """Continue after the checkpoint at `step`, whose weights the model was built with."""
        path = checkpoint_dir(self.work_dir, step)
        state = read_state(path)
        if state.get("total_steps") != self.plan.total_steps or state.get("n_rows") != self.plan.n_rows:
            raise RuntimeError(f"checkpoint {path} was written for another schedule or data; refusing to resume")
        self.model.load_optimizer_state(state)
        set_rng_state(state["rng"])
        self.progress = Progress.from_state(state)
        self.resumed_from = step

    def announce_resume(self, kept: list[int]) -> None:
        step = self.resumed_from
        rows = self.progress.metrics_rows
        if is_pause_checkpoint(self.work_dir, step):
            self.hooks.on_event(
                "info",
                f"Resumed from where the job paused, after step {step} (weights, optimizer, RNG and data position).",
                {"step": step},
            )
            return
        self.hooks.on_event(
            "info",
            f"Resumed from the checkpoint at step {step} (weights, optimizer, RNG and data position).",
            {"step": step},
        )
        # The checkpoint may have been saved but not yet published when the previous worker died.
        self.hooks.on_checkpoint(
            step,
            checkpoint_dir(self.work_dir, step),
            rows[-1] if rows and rows[-1]["step"] == step else {"step": step},
            kept,
        )

    # --- the steps --------------------------------------------------------------------------------------

    def run(self) -> bool:
        """Train to the last step, or until early stopping; True if should_stop() or should_pause() ended the run
        first (`paused` tells which)."""
        progress = self.progress
        self._started, self._first_step = time.perf_counter(), progress.step
        try:
            while progress.step < self.plan.total_steps and not progress.early_stopped:
                progress.step += 1
                self._step(progress.step)
                if progress.step < self.plan.total_steps and not progress.early_stopped and self.hooks.should_pause():
                    self._pause(progress.step)
                    return True
        except Stopped:
            return True
        return False

    def _pause(self, step: int) -> None:
        """Save the state after `step` (unless its regular checkpoint already holds it) and tell the hooks."""
        if step not in checkpoint_steps(self.work_dir):
            save_pause_checkpoint(self.work_dir, step, self._write_checkpoint)
        self.paused = True
        self.hooks.on_event("info", f"Checkpoint for the pause saved after step {step}.", {"step": step})

    def _step(self, step: int) -> None:
        plan = self.plan
        indices, epoch, epoch_end = self.order.batch_for(step)
        learning_rate = plan.learning_rate_at(step)
        self._train(indices, learning_rate)
        if step != plan.total_steps and self.trainer.ask_stop():
            raise Stopped
        checkpoint = plan.is_checkpoint(step, epoch, epoch_end)  # the last step is one
        full_eval = bool(self.valid_full) and checkpoint
        sample_eval = bool(self.valid_sample) and not full_eval and plan.is_eval_step(step)
        if full_eval or sample_eval or checkpoint or step % self.spec.log_every_steps == 0:
            metrics = self._log(step, learning_rate, "full" if full_eval else "sample" if sample_eval else None)
            if checkpoint:
                self._checkpoint(step, epoch, metrics, judge=full_eval)

    def _train(self, indices: list[int], learning_rate: float) -> None:
        started = time.perf_counter()
        micro = self.plan.train_micro_batches([self.data.train.rows[i] for i in indices])
        loss_sum, correct, n_targets, n_real, n_positions = self.trainer.train_step(micro, self.model.scaler)
        self.model.update(learning_rate, self.spec.max_grad_norm)
        acc = self.progress.acc
        acc["seconds"] += time.perf_counter() - started
        acc["loss"] += loss_sum
        acc["correct"] += correct
        acc["targets"] += n_targets
        acc["tokens"] += n_real
        acc["positions"] += n_positions
        for key, value in self.trainer.take_sums().items():
            acc[key] = acc.get(key, 0.0) + value
        self.progress.trained_tokens += n_real

    def _log(self, step: int, learning_rate: float, validation: str | None) -> dict[str, Any]:
        """Report the metrics since the last logged step, with the loss over the validation "sample" or the
        "full" validation subset."""
        progress, acc = self.progress, self.progress.acc
        metrics: dict[str, Any] = {
            "train_loss": _round(acc["loss"] / acc["targets"]),
            **self.trainer.train_metrics(acc),
            "valid_loss": None,
            "learning_rate": learning_rate,
            "tokens_per_second": _round(acc["tokens"] / acc["seconds"] if acc["seconds"] > 0 else 0.0, 2),
            "trained_tokens": progress.trained_tokens,
            "epoch": _round(step / self.plan.steps_per_epoch, 4),
            "padding_fraction": _round(1 - acc["tokens"] / acc["positions"], 4) if acc["positions"] else 0.0,
            "peak_memory_mb": peak_memory_mb(self.model.setup.device),
        }
        progress.train_loss = metrics["train_loss"]
        if validation is not None:
            loss, measured = self.trainer.evaluate(self.valid_full if validation == "full" else self.valid_sample)
            metrics["valid_loss"] = _round(loss)
            metrics |= {f"valid_{name}": value for name, value in measured.items()}
            if validation == "full":
                progress.valid_loss = metrics["full_valid_loss"] = metrics["valid_loss"]
                metrics |= {f"full_valid_{name}": value for name, value in measured.items()}
        done_here = step - self._first_step
        elapsed = time.perf_counter() - self._started
        metrics["eta_seconds"] = _round(elapsed / done_here * (self.plan.total_steps - step), 1) if done_here else None
        progress.metrics_rows.append({"step": step, **metrics})
        self.hooks.on_metrics(step, self.plan.total_steps, metrics)
        progress.acc = _no_sums()
        return metrics

    # --- checkpoints ------------------------------------------------------------------------------------

    def _checkpoint(self, step: int, epoch: int, metrics: dict[str, Any], judge: bool) -> None:
        progress = self.progress
        if judge:
            self._judge(metrics["full_valid_loss"], last=step == self.plan.total_steps)
        existing = regular_checkpoint_steps(self.work_dir)  # pause checkpoints are pruned here
        kept = kept_checkpoints(existing, step, progress.best_step, self.spec.keep_checkpoints)
        path = save_checkpoint(self.work_dir, step, kept, self._write_checkpoint)
        self.hooks.on_checkpoint(
            step, path, {"step": step, "epoch": epoch, **metrics, "is_best": progress.best_step == step}, kept
        )
        if progress.early_stopped:
            self.hooks.on_event(
                "info",
                f"Early stopping at step {step}: the validation loss has not improved for "
                f"{progress.bad_checkpoints} checkpoints (best {progress.best_loss:.4f} at step {progress.best_step}).",
                {"step": step, "best_step": progress.best_step, "best_valid_loss": progress.best_loss},
            )

    def _judge(self, loss: float, last: bool) -> None:
        """The best checkpoint so far, or one more without improvement: early_stopping_patience of those stop
        the run (unless it ends anyway)."""
        progress = self.progress
        if progress.best_loss is None or loss < progress.best_loss - self.spec.early_stopping_threshold:
            progress.best_step, progress.best_loss, progress.bad_checkpoints = progress.step, loss, 0
            return
        progress.bad_checkpoints += 1
        patience = self.spec.early_stopping_patience
        if patience is not None and progress.bad_checkpoints >= patience and not last:
            progress.early_stopped = True

    def _write_checkpoint(self, tmp: Path) -> None:
        self.model.save(tmp)
        step = self.progress.step
        state = {
            **self.progress.as_state(),
            "total_steps": self.plan.total_steps,
            "n_rows": self.plan.n_rows,
            **self.model.optimizer_state(),
            "rng": rng_state(),
            "data_position": self.plan.data_position(step),
        }
        write_state(tmp, state)

"""The fine-tuning stage: load the data, train, publish the adapter and metrics, finish the job.

Runs under a held lease (worker/lease.py). Every write is conditioned on that lease (worker/stage_kit.py),
so a worker that lost its job (the reconciler gave it to another) cannot overwrite the new owner's progress.

The job's work directory (`settings.work_dir/<job id>`, a shared volume in production) outlives a dead
worker: it holds the checkpoints a requeued job resumes from. It is removed once the job is finished
(succeeded, failed or cancelled), never by a worker that lost the lease. Tokenized files are cached in
`settings.work_dir/token-cache/<project id>`, keyed by project, file content, template and tokenizer: a project
never learns from a cache hit that another trained on the same file.

A pause is taken at the first optimizer-step boundary after it is asked: the loop checkpoints there (optimizer,
RNG, data position), the job becomes `paused` and the worker is free; a resume queues it again and the next
worker continues from that checkpoint as from a dead worker's, to the same weights.

A cancel reaches the job while its files are read and tokenized too (JobProgress.check_stop, before each
example), not only between training steps. Published checkpoints hold the adapter's weights and a manifest,
never the training state (optimizer, RNG): that stays in the work directory, for resuming.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select

from jobs.evaluation import enqueue_follow_up
from jobs.export import create_chained_export
from jobs.fine_tune_spec import FineTuneSpec
from models.base import unix
from models.config import get_settings
from models.db import session_scope
from models.file import File
from models.job import Checkpoint, Job
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.results import publish_file
from models.storage import delete_after_commit, get_storage
from models.transitions import add_event
from worker.archives import unpack_tar
from worker.fine_tune_steps import (
    dataset_file,
    init_archive,
    pack_adapter,
    pack_checkpoint,
    pack_dir,
    plot_losses,
    write_metrics_csv,
    write_tensorboard,
)
from worker.lease import Lease
from worker.stage_kit import (
    StageProgress,
    Stopped,
    confirm_cancelled,
    confirm_paused,
    finish,
    finish_at,
    load_job,
    write_under_lease,
)

log = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.5  # while the data is prepared, the job's status is read at most this often


class JobProgress(StageProgress):
    """TrainingHooks that record progress, metrics and checkpoints on the job."""

    def __init__(self, job: Job, lease: Lease, work_dir: Path):
        super().__init__(job.id, lease)
        self.project_id = job.project_id
        self.model = job.model
        self.adapter = job.spec.get("adapter")
        self.dpo = job.spec.get("dpo")
        self.work_dir = work_dir
        self._last_poll = 0.0

    def on_start(self, total_steps: int, stats: dict) -> None:
        resumed = stats.get("resumed_from_step")
        with session_scope() as session:
            values = {
                "total_steps": total_steps,
                "hyperparameters": {
                    "n_epochs": stats.get("n_epochs"),
                    "batch_size": stats.get("batch_size"),
                    "learning_rate_multiplier": stats.get("learning_rate_multiplier", 1.0),
                    "learning_rate": stats.get("learning_rate"),
                    "gradient_accumulation_steps": stats.get("gradient_accumulation_steps"),
                }
                | ({"beta": self.dpo["beta"]} if self.dpo else {}),
            }
            if resumed is None:
                values |= {"step": 0, "trained_tokens": 0}
            else:
                values["step"] = resumed
            self.write(session, **values)
            add_event(
                session,
                self.job_id,
                "info",
                f"Training on {stats.get('n_examples')} examples for {total_steps} steps "
                f"on {stats.get('device', 'cpu')} ({stats.get('mixed_precision')}, "
                f"{stats.get('adapter_type')}; tokenization cache {stats.get('tokenization_cache')}). "
                f"Precision {stats.get('mixed_precision')}: {stats.get('mixed_precision_reason')}.",
                data=stats,
            )
            # Told once: a resumed job has already warned about its examples.
            for message, data in _example_warnings(stats) if resumed is None else []:
                add_event(session, self.job_id, "warning", message, data=data, level="warn")

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None:
        finish = finish_at(metrics.get("eta_seconds"))
        data = {"step": step, "total_steps": total_steps} | {k: v for k, v in metrics.items() if v is not None}
        if finish is not None:
            data["estimated_finish"] = unix(finish)
        parts = [f"Step {step}/{total_steps}"]
        if metrics.get("train_loss") is not None:
            parts.append(f"training loss={metrics['train_loss']:.4f}")
        if metrics.get("valid_loss") is not None:
            parts.append(f"validation loss={metrics['valid_loss']:.4f}")
        if metrics.get("valid_rewards/accuracies") is not None:
            parts.append(f"validation reward accuracy={metrics['valid_rewards/accuracies']:.3f}")
        if metrics.get("tokens_per_second"):
            parts.append(f"{metrics['tokens_per_second']:.0f} tokens/s")
        with session_scope() as session:
            if self.write(session, step=step, trained_tokens=metrics.get("trained_tokens"), estimated_finish=finish):
                add_event(session, self.job_id, "metrics", ", ".join(parts), data=data)

    def on_checkpoint(self, step: int, path: Path, metrics: dict, kept: list[int]) -> None:
        """Publish the checkpoint (once, even if called again after a resume) and drop pruned ones."""
        archive = None
        try:
            with session_scope() as session:
                # Holding the lease is checked, and the job row locked, in this very transaction.
                if not self.write(session, step=step):
                    return
                known = session.scalar(
                    select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
                )
                if known is None and path.is_dir():
                    archive = pack_checkpoint(
                        path,
                        self.work_dir / f"checkpoint-{step}.tar",
                        {"job_id": self.job_id, "base_model": self.model, "adapter": self.adapter, "step": step},
                    )
                    file = publish_file(
                        session,
                        self.project_id,
                        archive,
                        f"{self.job_id}-step-{step}-checkpoint.tar",
                        job_id=self.job_id,
                    )
                    session.add(Checkpoint(job_id=self.job_id, step=step, metrics=metrics, file_id=file.id))
                    add_event(
                        session,
                        self.job_id,
                        "checkpoint",
                        f"Checkpoint saved at step {step}.",
                        data={"step": step, "file_id": file.id} | _plain(metrics),
                    )
                elif known is not None and metrics.get("is_best") is not None:
                    known.metrics = (known.metrics or {}) | {"is_best": metrics["is_best"]}
                for old in session.scalars(
                    select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step.not_in(kept))
                ):
                    _delete_checkpoint(session, old)
                # Only the best checkpoint carries is_best.
                for other in session.scalars(
                    select(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step != step)
                ):
                    if metrics.get("is_best") and (other.metrics or {}).get("is_best"):
                        other.metrics = other.metrics | {"is_best": False}
        finally:
            if archive is not None:
                archive.unlink(missing_ok=True)

    def on_event(self, type: str, message: str, data: dict) -> None:
        with session_scope() as session:
            if self.write(session):
                add_event(session, self.job_id, type, message, data=data)

    def should_stop(self) -> bool:
        """Asked after every optimizer step. The heartbeat polls only once a second, so a cancel is also
        read here: one primary-key lookup per step is what stops a job within one step of the request."""
        if self.lease.should_stop:
            return True
        with session_scope() as session:
            status = session.scalar(select(Job.status).where(Job.id == self.job_id))
        self.lease.note(status)
        return self.lease.should_stop

    def should_pause(self) -> bool:
        """Asked after every optimizer step but the last, right after should_stop (whose read raised the flag)."""
        return self.lease.pause_requested.is_set()

    def check_stop(self) -> None:
        """Raise Stopped once a cancel is asked or the lease lost: called before each example while the data is
        read and tokenized, so it reads the job's status (as should_stop does) at most every STOP_POLL_SECONDS."""
        now = time.monotonic()
        if now - self._last_poll >= STOP_POLL_SECONDS:
            self._last_poll = now
            self.should_stop()
        super().check_stop()


def _example_warnings(stats: dict) -> list[tuple[str, dict]]:
    """(message, data) about the training examples that were cut or left out."""
    warnings = []
    if truncated := stats.get("n_truncated") or 0:
        warnings.append(
            (
                f"{truncated} training examples were longer than max_seq_len and were truncated.",
                {"n_truncated": truncated, "max_seq_len": stats.get("max_seq_len")},
            )
        )
    if skipped := stats.get("n_skipped") or 0:
        warnings.append(
            (
                f"{skipped} training examples had no tokens to train on (all weights 0, or the trained "
                "part was cut off by max_seq_len) and were skipped.",
                {"n_skipped": skipped},
            )
        )
    return warnings


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if v is not None and k != "step"}


def _delete_checkpoint(session, checkpoint: Checkpoint) -> None:
    if checkpoint.file_id:
        file = session.get(File, checkpoint.file_id)
        if file is not None:
            delete_after_commit(session, file.storage_key)
            session.delete(file)
    session.delete(checkpoint)


def run(job_id: str, lease: Lease) -> None:
    # Heavy imports stay here so that the API and the reconciler never load torch.
    from worker.data import read_training_examples
    from worker.model_setup import merge_model
    from worker.token_cache import cache_key, project_cache_dir, tokenizer_fingerprint
    from worker.train import DataSource, train_adapter

    with session_scope() as session:
        job, spec = load_job(session, job_id, FineTuneSpec)
        training = dataset_file(session, job, spec.training_file, "training_file")
        validation = dataset_file(session, job, spec.validation_file, "validation_file")
        init_key = init_archive(session, job, spec)

    base = resolve_model(spec.model)
    settings = get_settings()
    work_root = settings.work_dir.resolve()
    work_dir = work_root / job.id
    # Not wiped: checkpoints of an earlier attempt of this job (its worker died) are resumed from.
    work_dir.mkdir(parents=True, exist_ok=True)
    keep_work_dir = False
    try:
        # The stored files themselves on a shared volume; copies in the work directory from a bucket.
        storage, inputs = get_storage(), work_dir / "inputs"
        init_dir = None
        if init_key is not None:
            init_dir = work_dir / "init"
            shutil.rmtree(init_dir, ignore_errors=True)
            init_dir.mkdir()
            unpack_tar(storage.fetch(init_key, inputs), init_dir)
        fingerprint = tokenizer_fingerprint(base.path)

        progress = JobProgress(job, lease, work_dir)

        def source(found: tuple[str, str] | None, param: str) -> DataSource | None:
            if found is None:
                return None
            key, sha256 = found
            return DataSource(
                # Fetched only when the tokenization cache misses.
                load=lambda: read_training_examples(
                    storage.fetch(key, inputs), spec.text_template, param, progress.check_stop
                ),
                cache_key=cache_key(sha256, spec.text_template, fingerprint, project_id=job.project_id),
                check_stop=progress.check_stop,
            )

        try:
            outcome = train_adapter(
                spec,
                base.path,
                source(training, "training_file"),
                source(validation, "validation_file"),
                work_dir / "train",
                progress,
                init_dir=init_dir,
                cache_dir=project_cache_dir(work_root / "token-cache", job.project_id),
                compile_cache_dir=work_root / "compile-cache",
            )
        except Stopped:  # raised by progress.check_stop, while the data was read or tokenized: before any step
            keep_work_dir = lease.lost.is_set()
            if not keep_work_dir:
                confirm_cancelled(job.id, lease, "Job cancelled while its training data was being prepared.")
            return
        if outcome.stopped and lease.lost.is_set():
            keep_work_dir = True  # the job is another worker's now, and so is this directory
            return
        if outcome.paused:
            # The checkpoint it paused at is in this directory; a cancel that came meanwhile wins.
            keep_work_dir = confirm_paused(job.id, lease, outcome.steps)
            if keep_work_dir:
                return
        if not outcome.stopped:
            merged = None
            if spec.merged_model:
                merged = merge_model(
                    base.path, outcome.adapter_dir, spec.adapter.type, spec.merged_model, work_dir / "merged"
                )
            artifacts = _result_files(job, spec, outcome, work_dir, merged)
            if _publish_and_succeed(job, lease, artifacts, outcome):
                return
        # Stopped by a cancel: during training, or while publishing (it won the race to the final switch).
        confirm_cancelled(job.id, lease, f"Job cancelled after {outcome.steps} steps.", data={"step": outcome.steps})
    except BaseException:
        keep_work_dir = lease.lost.is_set()
        raise
    finally:
        if not keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)


def _result_files(job: Job, spec: FineTuneSpec, outcome, work_dir: Path, merged: Path | None) -> list[tuple[Path, str]]:
    """(local file, published name) of each result file; the adapter comes first."""
    manifest = {
        "job_id": job.id,
        "base_model": job.model,
        "adapter": spec.adapter.model_dump(mode="json"),
        "steps": outcome.steps,
        "result_step": outcome.result_step,
        "trained_tokens": outcome.trained_tokens,
    }
    rows = outcome.metrics_rows
    files = [
        (pack_adapter(outcome.adapter_dir, work_dir / "adapter.tar", manifest), f"{job.id}-adapter.tar"),
        (write_metrics_csv(rows, work_dir / "metrics.csv"), f"{job.id}-metrics.csv"),
        (plot_losses(rows, work_dir / "loss.png", f"{job.id} ({job.model})"), f"{job.id}-loss.png"),
        (pack_dir(write_tensorboard(rows, work_dir / "tensorboard"), work_dir / "tb.tar"), f"{job.id}-tensorboard.tar"),
    ]
    if merged is not None:
        files.append((pack_dir(merged, work_dir / "merged.tar"), f"{job.id}-merged-{spec.merged_model}.tar"))
    return files


def _publish_and_succeed(job: Job, lease: Lease, artifacts: list[tuple[Path, str]], outcome) -> bool:
    # One transaction: the result files, the job's pointers to them and `succeeded` land together,
    # or (lease lost, cancel won the race) none of them does and the copies are removed.
    with session_scope() as session:
        files = [publish_file(session, job.project_id, path, name, job_id=job.id) for path, name in artifacts]
        adapter = files[0]
        names = ["adapter", "metrics", "loss_plot", "tensorboard", "merged_model"]
        summary = {
            "files": {name: file.id for name, file in zip(names, files, strict=False)},
            "result_step": outcome.result_step,
            "steps": outcome.steps,
            "best_step": outcome.best_step,
            "best_valid_loss": outcome.best_valid_loss,
            "early_stopped": outcome.early_stopped,
            "resumed_from_step": outcome.resumed_from,
            "train_loss": outcome.train_loss,
            "valid_loss": outcome.valid_loss,
        }
        write_under_lease(
            session,
            job.id,
            lease,
            result_files=[f.id for f in files],
            fine_tuned_model=f"{job.model}:ft:{job.id}",
            trained_tokens=outcome.trained_tokens,
            step=outcome.steps,
            estimated_finish=None,
            result=summary,
        )
        message = None
        if outcome.early_stopped:
            message = (
                f"The job stopped early at step {outcome.steps} of {outcome.total_steps}; "
                f"the result is the best checkpoint (step {outcome.result_step})."
            )
        succeeded = finish(
            session,
            job.id,
            lease,
            JobStatus.succeeded,
            message=message,
            data={
                "trained_tokens": outcome.trained_tokens,
                "train_loss": outcome.train_loss,
                "valid_loss": outcome.valid_loss,
                "result_files": [f.id for f in files],
                "result_step": outcome.result_step,
            },
        )
        if succeeded:
            create_chained_export(session, job, adapter)
            if job.spec.get("evaluation"):
                enqueue_follow_up(session, job, adapter.id)
    return succeeded

"""The fine-tuning stage: load the data, train, publish the adapter and metrics, finish the job.

Runs under a held lease (worker/lease.py). Every write is conditioned on that lease, so a worker that
lost its job (the reconciler gave it to another) cannot overwrite the new owner's progress.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tarfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from models.base import utcnow
from models.config import get_settings
from models.datasets import read_examples
from models.db import session_scope
from models.errors import InvalidRequest
from models.file import File
from models.job import Checkpoint, Job
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.results import publish_file
from models.specs import FineTuneSpec
from models.storage import get_storage
from models.transitions import add_event, switch_job_status
from worker.lease import Lease

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second", "trained_tokens"]


class JobProgress:
    """TrainingHooks that record progress, metrics and checkpoints on the job."""

    def __init__(self, job: Job, lease: Lease, work_dir: Path):
        self.job_id = job.id
        self.project_id = job.project_id
        self.model = job.model
        self.lease = lease
        self.work_dir = work_dir
        self.started = time.monotonic()

    def _update_job(self, session, **values) -> None:
        session.execute(
            update(Job)
            .where(Job.id == self.job_id, Job.lease_owner == self.lease.owner)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    def on_start(self, total_steps: int, stats: dict) -> None:
        with session_scope() as session:
            self._update_job(
                session,
                total_steps=total_steps,
                step=0,
                trained_tokens=0,
                hyperparameters={
                    "n_epochs": stats.get("n_epochs"),
                    "batch_size": stats.get("batch_size"),
                    "learning_rate_multiplier": stats.get("learning_rate_multiplier", 1.0),
                    "learning_rate": stats.get("learning_rate"),
                },
            )
            add_event(
                session,
                self.job_id,
                "info",
                f"Training on {stats.get('n_examples')} examples for {total_steps} steps "
                f"on {stats.get('device', 'cpu')}.",
                data=stats,
            )
            truncated = stats.get("n_truncated") or 0
            if truncated:
                add_event(
                    session,
                    self.job_id,
                    "warning",
                    f"{truncated} training examples were longer than max_seq_len and were truncated.",
                    data={"n_truncated": truncated},
                    level="warning",
                )
            skipped = stats.get("n_skipped") or 0
            if skipped:
                add_event(
                    session,
                    self.job_id,
                    "warning",
                    f"{skipped} training examples had no tokens to train on (all weights 0, or the trained "
                    "part was cut off by max_seq_len) and were skipped.",
                    data={"n_skipped": skipped},
                    level="warning",
                )

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None:
        elapsed = time.monotonic() - self.started
        remaining = elapsed / step * (total_steps - step) if step else None
        data = {"step": step, "total_steps": total_steps} | {k: v for k, v in metrics.items() if v is not None}
        parts = [f"Step {step}/{total_steps}"]
        if metrics.get("train_loss") is not None:
            parts.append(f"training loss={metrics['train_loss']:.4f}")
        if metrics.get("valid_loss") is not None:
            parts.append(f"validation loss={metrics['valid_loss']:.4f}")
        with session_scope() as session:
            self._update_job(
                session,
                step=step,
                trained_tokens=metrics.get("trained_tokens"),
                estimated_finish=utcnow() + timedelta(seconds=remaining) if remaining is not None else None,
            )
            add_event(session, self.job_id, "metrics", ", ".join(parts), data=data)

    def on_checkpoint(self, step: int, path: Path, metrics: dict) -> None:
        archive = pack_adapter(
            path,
            self.work_dir / f"checkpoint-{step}.tar",
            {"job_id": self.job_id, "base_model": self.model, "step": step},
        )
        with session_scope() as session:
            file = publish_file(
                session, self.project_id, archive, f"{self.job_id}-step-{step}-adapter.tar", job_id=self.job_id
            )
            session.add(Checkpoint(job_id=self.job_id, step=step, metrics={"step": step} | metrics, file_id=file.id))
            add_event(
                session,
                self.job_id,
                "checkpoint",
                f"Checkpoint saved at step {step}.",
                data={"step": step, "file_id": file.id},
            )
        archive.unlink(missing_ok=True)

    def should_stop(self) -> bool:
        return self.lease.should_stop


def pack_adapter(adapter_dir: Path, archive: Path, manifest: dict) -> Path:
    """A flat tar of the adapter files plus a manifest: `tar -xf` gives a dir PeftModel can load."""
    manifest_path = adapter_dir / "grove-manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    with tarfile.open(archive, "w") as tar:
        for path in sorted(adapter_dir.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(adapter_dir)))
    return archive


def write_metrics_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    return path


def _dataset_path(session, job: Job, file_id: str | None, param: str) -> Path | None:
    if file_id is None:
        return None
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == job.project_id))
    if file is None:
        raise InvalidRequest(
            f"The {param} {file_id} was deleted before the job ran.", param=param, code="file_not_found"
        )
    return get_storage().path_of(file.storage_key)


def run(job_id: str, lease: Lease) -> None:
    # Heavy imports stay here so that the API and the reconciler never load torch.
    from worker.train import train_adapter

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        spec = FineTuneSpec.model_validate(job.spec)
        training_path = _dataset_path(session, job, spec.training_file, "training_file")
        validation_path = _dataset_path(session, job, spec.validation_file, "validation_file")

    base = resolve_model(spec.model)
    work_dir = get_settings().work_dir.resolve() / job.id
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        train_examples = read_examples(training_path, spec.text_template)
        valid_examples = read_examples(validation_path, spec.text_template) if validation_path else None
        progress = JobProgress(job, lease, work_dir)
        outcome = train_adapter(spec, base.path, train_examples, valid_examples, work_dir / "train", progress)
        if outcome.stopped:
            _finish_stopped(job, lease, outcome.steps)
            return
        adapter_tar = pack_adapter(
            outcome.adapter_dir,
            work_dir / "adapter.tar",
            {
                "job_id": job.id,
                "base_model": job.model,
                "adapter": spec.adapter.model_dump(mode="json"),
                "steps": outcome.steps,
                "trained_tokens": outcome.trained_tokens,
            },
        )
        metrics_csv = write_metrics_csv(outcome.metrics_rows, work_dir / "metrics.csv")
        _publish_and_succeed(job, lease, adapter_tar, metrics_csv, outcome)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _publish_and_succeed(job: Job, lease: Lease, adapter_tar: Path, metrics_csv: Path, outcome) -> None:
    # One transaction: the result files, the job's pointers to them and `succeeded` land together,
    # or (lease lost, cancel won the race) none of them does and the copies are removed.
    with session_scope() as session:
        adapter = publish_file(session, job.project_id, adapter_tar, f"{job.id}-adapter.tar", job_id=job.id)
        metrics = publish_file(session, job.project_id, metrics_csv, f"{job.id}-metrics.csv", job_id=job.id)
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.lease_owner == lease.owner)
            .values(
                result_files=[adapter.id, metrics.id],
                fine_tuned_model=f"{job.model}:ft:{job.id}",
                trained_tokens=outcome.trained_tokens,
                step=outcome.steps,
                estimated_finish=None,
            )
            .execution_options(synchronize_session=False)
        )
        succeeded = switch_job_status(
            session,
            job.id,
            JobStatus.succeeded,
            only_from={JobStatus.running},
            lease_owner=lease.owner,
            data={
                "trained_tokens": outcome.trained_tokens,
                "train_loss": outcome.train_loss,
                "valid_loss": outcome.valid_loss,
                "result_files": [adapter.id, metrics.id],
            },
        )
        if not succeeded:
            session.rollback()
    if not succeeded:
        # A cancel arrived while publishing: honour it.
        _finish_stopped(job, lease, outcome.steps)


def _finish_stopped(job: Job, lease: Lease, steps: int) -> None:
    with session_scope() as session:
        switch_job_status(
            session,
            job.id,
            JobStatus.cancelled,
            only_from={JobStatus.cancelling},
            lease_owner=lease.owner,
            message=f"Job cancelled after {steps} steps.",
            data={"step": steps},
        )

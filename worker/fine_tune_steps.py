"""The fine-tuning stage's steps around training (worker/fine_tune.py): finding its input files, packing what it
publishes (the adapter, its checkpoints without their training state), and writing the result files made of its
metrics (a CSV, a loss plot, TensorBoard events)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from sqlalchemy import select

from jobs.fine_tune_spec import FineTuneSpec
from models.errors import InvalidRequest
from models.file import File
from models.job import Checkpoint, Job
from worker.archives import pack_tar
from worker.checkpoints import copy_weights
from worker.stage_kit import adapter_file, project_file

# The first six are the original columns; later ones were added after them.
METRIC_COLUMNS = [
    "step",
    "train_loss",
    "valid_loss",
    "learning_rate",
    "tokens_per_second",
    "trained_tokens",
    "epoch",
    "full_valid_loss",
    "train_mean_token_accuracy",
    "valid_mean_token_accuracy",
    "padding_fraction",
    "peak_memory_mb",
    # DPO jobs (worker/dpo_step.py), TRL's names; empty for supervised jobs.
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "valid_rewards/chosen",
    "valid_rewards/rejected",
    "valid_rewards/margins",
    "valid_rewards/accuracies",
    "full_valid_rewards/accuracies",
]
TENSORBOARD_TAGS = {
    "train_loss": "loss/train",
    "valid_loss": "loss/valid",
    "full_valid_loss": "loss/full_valid",
    "learning_rate": "learning_rate",
    "tokens_per_second": "throughput/tokens_per_second",
    "train_mean_token_accuracy": "accuracy/train",
    "valid_mean_token_accuracy": "accuracy/valid",
    "padding_fraction": "padding_fraction",
    "peak_memory_mb": "memory/peak_mb",
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margins": "rewards/margins",
    "rewards/accuracies": "rewards/accuracies",
    "valid_rewards/margins": "rewards/valid_margins",
    "valid_rewards/accuracies": "rewards/valid_accuracies",
}


def dataset_file(session, job: Job, file_id: str | None, param: str) -> tuple[str, str] | None:
    if file_id is None:
        return None
    file = project_file(session, job.project_id, file_id)
    if file is None:
        raise InvalidRequest(
            f"The {param} {file_id} was deleted before the job ran.", param=param, code="file_not_found"
        )
    return file.storage_key, file.sha256


def init_archive(session, job: Job, spec: FineTuneSpec) -> str | None:
    """The storage key of the adapter archive a job continues from (from_job's result or from_checkpoint's file)."""
    if spec.from_checkpoint:
        # Possibly another project's checkpoint, shared with this one: adapter_file reaches its archive only.
        checkpoint = session.get(Checkpoint, spec.from_checkpoint)
        file_id, param = (checkpoint.file_id if checkpoint else None), "from_checkpoint"
        file = adapter_file(session, job.project_id, file_id, spec.from_checkpoint) if file_id else None
    elif spec.from_job:
        source = session.scalar(select(Job).where(Job.id == spec.from_job, Job.project_id == job.project_id))
        file_id, param = (source.result_files[0] if source and source.result_files else None), "from_job"
        file = session.get(File, file_id) if file_id else None
    else:
        return None
    if file is None:
        raise InvalidRequest(
            f"The adapter of {param}={getattr(spec, param)} was deleted before the job ran.",
            param=param,
            code="file_not_found",
        )
    return file.storage_key


def pack_adapter(adapter_dir: Path, archive: Path, manifest: dict) -> Path:
    """A flat tar of the adapter files plus a manifest: `tar -xf` gives a dir PeftModel can load."""
    manifest_path = adapter_dir / "grove-manifest.json"
    manifest_path.unlink(missing_ok=True)  # a new file, never written through a link to a checkpoint's
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return pack_tar(adapter_dir, archive)


def pack_checkpoint(checkpoint: Path, archive: Path, manifest: dict) -> Path:
    """A checkpoint as users download it: its weights and a manifest, as pack_adapter packs an adapter.

    Not its training state (optimizer, RNG, progress), which only a resume on the worker reads: what a user
    downloads is the adapter, safetensors and JSON, and nothing a loader would have to trust."""
    staged = archive.with_name(f".{archive.name}.files")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        copy_weights(checkpoint, staged)
        return pack_adapter(staged, archive, manifest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def pack_dir(directory: Path, archive: Path) -> Path:
    """The regular files below `directory` (never a symlink), named relative to it (worker/archives.py)."""
    return pack_tar(directory, archive)


def write_metrics_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    return path


def plot_losses(rows: list[dict], path: Path, title: str) -> Path:
    """Training and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for key, label, style in [
        ("train_loss", "training loss", "-"),
        ("valid_loss", "validation loss (sample)", "--"),
        ("full_valid_loss", "validation loss (full)", "o"),
    ]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_tensorboard(rows: list[dict], directory: Path) -> Path:
    """One TensorBoard event file of the logged scalars (`tensorboard --logdir` reads it)."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for row in rows:
            for key, tag in TENSORBOARD_TAGS.items():
                if isinstance(row.get(key), int | float):
                    writer.add_scalar(tag, row[key], int(row["step"]))
    return directory

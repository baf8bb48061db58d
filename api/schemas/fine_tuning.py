"""OpenAI fine-tuning objects, plus Grove's documented extensions (sent by the SDK via `extra_body`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from api.schemas.common import JobEventObject
from jobs.checkpoints import checkpoint_name
from jobs.fine_tune_spec import TrainingOptions
from models.base import unix
from models.job import Checkpoint, Job, JobEvent
from models.job_status import JobStatus


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str | None = Field(None, description="Grove extension: user_error (bad data or spec) or system_error.")


class Progress(BaseModel):
    step: int
    total_steps: int | None
    percent: float | None


# Statuses of Grove's own that OpenAI's enum lacks, as OpenAI-shaped clients are shown them: a job whose cancel or
# pause is asked is still running until its worker stops it (or has checkpointed and let go of it: `paused`, which
# OpenAI's API shows as is). `status_detail` carries Grove's own.
OPENAI_STATUS = {JobStatus.cancelling: JobStatus.running, JobStatus.pausing: JobStatus.running}
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


# Every TrainingOptions field is shown on the job as resolved at creation (defaults filled): declared here, so that
# OpenAPI documents each extension a client will meet. Typed loosely: a job created by an older version shows its
# spec as stored, which today's constraints might refuse.
_SHOWN_OPTIONS = create_model(
    "ShownTrainingOptions",
    **{
        name: (Any, Field(None, description=f"Grove extension, as the job was created: {field.description}"))
        for name, field in TrainingOptions.model_fields.items()
        if name not in {"adapter", "max_steps", "learning_rate", "max_seq_len", "text_template"}
    },
)


class FineTuningJobObject(_SHOWN_OPTIONS):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict
    method: dict
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str = Field(
        description="OpenAI's status: validating_files, queued, running, paused, succeeded, failed or cancelled. "
        "A job whose cancel or pause was asked shows running until its worker has stopped (status_detail says "
        "cancelling or pausing)."
    )
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list = Field(default_factory=list)
    metadata: dict | None = None
    user_provided_suffix: str | None = None
    # Grove extensions: progress, the result summary, and every TrainingOptions field as resolved.
    model_config = ConfigDict(extra="allow")
    resolved_training: dict | None = Field(
        None,
        description="Grove extension: once the job runs, the peak `learning_rate` and the "
        "`gradient_accumulation_steps` it resolved (`hyperparameters` holds OpenAI's three).",
    )
    status_detail: str = Field(
        description="Grove extension: Grove's own status, which is `status` except `cancelling` and `pausing` (a "
        "cancel or pause asked, the worker stopping)."
    )
    started_at: int | None = None
    progress: Progress
    adapter: dict
    max_steps: int | None = None
    learning_rate: float | None = None
    max_seq_len: int
    text_template: str | None = None
    result: dict | None = Field(
        None,
        description="When finished: result file ids by kind (adapter, metrics, loss_plot, tensorboard, "
        "merged_model), result_step, best_step, best_valid_loss, early_stopped, resumed_from_step.",
    )

    @classmethod
    def from_row(cls, job: Job) -> FineTuningJobObject:
        spec = job.spec
        total = job.total_steps
        openai_hyperparameters = {k: v for k, v in job.hyperparameters.items() if k in OPENAI_HYPERPARAMETERS}
        return cls(
            id=job.id,
            created_at=unix(job.created_at),
            error=JobError(**job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=unix(job.finished_at),
            hyperparameters=openai_hyperparameters,
            method=_method(spec, openai_hyperparameters),
            resolved_training={k: v for k, v in job.hyperparameters.items() if k not in OPENAI_HYPERPARAMETERS} or None,
            model=job.model,
            organization_id=job.project_id,
            result_files=list(job.result_files or []),
            seed=spec["seed"],
            status=OPENAI_STATUS.get(job.status, job.status),
            status_detail=job.status,
            trained_tokens=job.trained_tokens,
            training_file=job.training_file_id or "",
            validation_file=job.validation_file_id,
            estimated_finish=unix(job.estimated_finish),
            metadata=job.user_metadata,
            user_provided_suffix=job.suffix,
            started_at=unix(job.started_at),
            progress=Progress(
                step=job.step,
                total_steps=total,
                percent=round(100.0 * job.step / total, 1) if total else None,
            ),
            result=job.result,
            **_options(spec),
        )


def _method(spec: dict, hyperparameters: dict) -> dict:
    """OpenAI's method object: its type, and the hyperparameters under the type's name (dpo's with beta)."""
    dpo = spec.get("dpo")
    if dpo is None:
        return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    return {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": dpo["beta"]}}}


def _options(spec: dict) -> dict:
    """The spec's TrainingOptions with defaults for fields added after the job was created."""
    known = {k: v for k, v in spec.items() if k in TrainingOptions.model_fields}
    try:
        return TrainingOptions.model_validate(known).model_dump(mode="json")
    except ValueError:  # a spec written by another version: show it as stored
        return known


class FineTuningJobEventObject(JobEventObject):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    type: Literal["message", "metrics"] = Field("message", description="OpenAI's coarse type.")
    event_type: str = Field(
        description="Grove extension: created, queued, started, metrics, checkpoint, cancelling, pausing, "
        "paused, succeeded, failed, cancelled, requeued, warning or info."
    )

    @classmethod
    def from_row(cls, event: JobEvent) -> FineTuningJobEventObject:
        row = super().from_row(event)
        row.type = "metrics" if event.type == "metrics" else "message"
        return row


# The metrics OpenAI's checkpoint object names; the rest of a step's metrics are a Grove extension beside them.
OPENAI_CHECKPOINT_METRICS = (
    "step",
    "train_loss",
    "valid_loss",
    "full_valid_loss",
    "train_mean_token_accuracy",
    "valid_mean_token_accuracy",
    "full_valid_mean_token_accuracy",
)


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict = Field(description=f"OpenAI's metrics at this step: {', '.join(OPENAI_CHECKPOINT_METRICS)}.")
    step_number: int
    file_id: str | None = Field(None, description="Grove extension: the checkpoint's adapter archive.")
    training_metrics: dict = Field(
        default_factory=dict,
        description="Grove extension: the step's other metrics (epoch, learning_rate, trained_tokens, "
        "tokens_per_second, peak_memory_mb, ...).",
    )

    @classmethod
    def from_row(cls, checkpoint: Checkpoint, job: Job) -> CheckpointObject:
        return cls(
            id=checkpoint.id,
            created_at=unix(checkpoint.created_at),
            fine_tuned_model_checkpoint=checkpoint_name(job, checkpoint),
            fine_tuning_job_id=job.id,
            metrics={k: v for k, v in (checkpoint.metrics or {}).items() if k in OPENAI_CHECKPOINT_METRICS},
            training_metrics={
                k: v for k, v in (checkpoint.metrics or {}).items() if k not in OPENAI_CHECKPOINT_METRICS
            },
            step_number=checkpoint.step,
            file_id=checkpoint.file_id,
        )

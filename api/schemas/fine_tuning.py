"""OpenAI fine-tuning objects, plus Grove's documented extensions (sent by the SDK via `extra_body`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas.common import JobEventObject
from jobs.fine_tune_spec import TrainingOptions
from models.base import unix
from models.job import Checkpoint, Job, JobEvent


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str | None = Field(None, description="Grove extension: user_error (bad data or spec) or system_error.")


class Progress(BaseModel):
    step: int
    total_steps: int | None
    percent: float | None


class FineTuningJobObject(BaseModel):
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
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list = Field(default_factory=list)
    metadata: dict | None = None
    user_provided_suffix: str | None = None
    # Grove extensions: progress, the result summary, and every TrainingOptions field as resolved (extra).
    model_config = ConfigDict(extra="allow")
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
        return cls(
            id=job.id,
            created_at=unix(job.created_at),
            error=JobError(**job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model,
            finished_at=unix(job.finished_at),
            hyperparameters=job.hyperparameters,
            method=_method(spec, job.hyperparameters),
            model=job.model,
            organization_id=job.project_id,
            result_files=list(job.result_files or []),
            seed=spec["seed"],
            status=job.status,
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
        description="Grove extension: created, queued, started, metrics, checkpoint, cancelling, "
        "succeeded, failed, cancelled, requeued, warning or info."
    )

    @classmethod
    def from_row(cls, event: JobEvent) -> FineTuningJobEventObject:
        row = super().from_row(event)
        row.type = "metrics" if event.type == "metrics" else "message"
        return row


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict
    step_number: int
    file_id: str | None = Field(None, description="Grove extension: the checkpoint's adapter archive.")

    @classmethod
    def from_row(cls, checkpoint: Checkpoint, job: Job) -> CheckpointObject:
        return cls(
            id=checkpoint.id,
            created_at=unix(checkpoint.created_at),
            fine_tuned_model_checkpoint=f"{job.model}:ckpt-step-{checkpoint.step}:{job.id}",
            fine_tuning_job_id=job.id,
            metrics=checkpoint.metrics or {},
            step_number=checkpoint.step,
            file_id=checkpoint.file_id,
        )

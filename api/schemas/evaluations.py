"""Evaluation jobs: the request (targets + data + settings) and the job and event objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas.common import JobEventObject
from jobs.evaluation_spec import MAX_TARGETS, EvaluationSettings
from models.base import unix
from models.job import Job


class TargetRequest(BaseModel):
    """One target: exactly one of model, fine_tuning_job or export_job."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A base model from GET /v1/models.")
    fine_tuning_job: str | None = Field(None, description="A succeeded fine-tuning job: its adapter.")
    checkpoint: str | int | None = Field(
        None, description="With fine_tuning_job: a checkpoint id (ftckpt-...) or step number instead of the result."
    )
    export_job: str | None = Field(None, description="A succeeded export job: its ONNX package.")
    adapter: str | None = Field(None, description="With export_job: the adapter of a multi-adapter package, by name.")
    name: str | None = Field(None, min_length=1, max_length=100, description="How the report names this target.")

    @model_validator(mode="after")
    def _one_kind(self) -> TargetRequest:
        given = [k for k in ("model", "fine_tuning_job", "export_job") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model, fine_tuning_job or export_job")
        if self.checkpoint is not None and self.fine_tuning_job is None:
            raise ValueError("checkpoint goes with fine_tuning_job")
        if self.adapter is not None and self.export_job is None:
            raise ValueError("adapter goes with export_job")
        return self


class CreateEvaluation(EvaluationSettings):
    evaluation_file: str = Field(description="Id of an uploaded JSONL (purpose fine-tune) to score the targets on.")
    targets: list[str | dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="What to score, in report order; differences are against the first. Each is an object "
        "({model} | {fine_tuning_job, checkpoint?} | {export_job, adapter?}, plus an optional name) or a string: a "
        "model name, a fine-tuning or export job id, or a checkpoint id.",
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)


class Progress(BaseModel):
    step: int = Field(description="Examples scored so far, over every target and pass.")
    total_steps: int | None
    percent: float | None


class EvaluationObject(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: str
    error: dict | None
    model: str = Field(description="The first target's base model.")
    evaluation_file: str
    targets: list[dict]
    metrics: list[str]
    settings: dict = Field(description="Template, normalisation, labels, generation settings, limits.")
    progress: Progress
    estimated_finish: int | None
    result: dict | None = Field(
        description="Once finished: each metric per target, the comparison against the first target, report_file."
    )
    result_files: list[str] = Field(description="[the report JSON].")
    parent_id: str | None = Field(description="The fine-tuning job that asked for this evaluation, if any.")
    metadata: dict | None = None

    @classmethod
    def from_row(cls, job: Job) -> EvaluationObject:
        spec = dict(job.spec)
        total = job.total_steps
        return cls(
            id=job.id,
            created_at=unix(job.created_at),
            started_at=unix(job.started_at),
            finished_at=unix(job.finished_at),
            status=job.status,
            error=job.error,
            model=job.model,
            evaluation_file=spec["evaluation_file"],
            targets=spec["targets"],
            metrics=spec["metrics"],
            settings={k: v for k, v in spec.items() if k not in ("version", "evaluation_file", "targets", "metrics")},
            progress=Progress(
                step=job.step,
                total_steps=total,
                percent=round(100.0 * job.step / total, 1) if total else None,
            ),
            estimated_finish=unix(job.estimated_finish),
            result=job.result,
            result_files=list(job.result_files or []),
            parent_id=job.parent_id,
            metadata=job.user_metadata,
        )


class EvaluationEventObject(JobEventObject):
    object: Literal["evaluation.event"] = "evaluation.event"
    event_type: str = Field(
        description="created, queued, started, info, metrics (one per target), warning, cancelling, succeeded, "
        "failed or cancelled."
    )

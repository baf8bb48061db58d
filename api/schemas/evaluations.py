"""Evaluation jobs: the request (targets + data + settings) and the job and event objects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import JobEventObject, job_times
from models.base import unix
from models.job import Job


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
            **job_times(job),
            error=job.error,
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

"""Export job objects (`/v1/exports`): same conventions as fine-tuning jobs (status, events, cancel, pages)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.schemas.common import job_times
from api.schemas.fine_tuning import FineTuningJobEventObject, JobError, Progress
from models.job import Job


class ExportJobObject(BaseModel):
    id: str
    object: Literal["export.job"] = "export.job"
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: str
    error: JobError | None
    organization_id: str
    model: str = Field(description="The base model.")
    adapters: list[dict] = Field(description="Resolved adapters: name, fine_tuning_job, checkpoint, rank, ...")
    precision: str
    execution_provider: str
    adapter_mode: str | None
    quantization: dict
    gate: dict
    queue: str = Field(description="The worker queue the job runs on (per execution provider).")
    parent_id: str | None = Field(None, description="The fine-tuning job that asked for this export, if any.")
    progress: Progress
    result_files: list[str] = Field(description="[archive, manifest.json, each .onnx_adapter] once succeeded.")
    result: dict | None = Field(None, description="The package manifest plus `files` and `archive`.")
    metadata: dict | None = None

    @classmethod
    def from_row(cls, job: Job) -> ExportJobObject:
        spec = job.spec
        total = job.total_steps
        return cls(
            **job_times(job),
            error=JobError(**job.error) if job.error else None,
            organization_id=job.project_id,
            adapters=spec.get("adapters", []),
            precision=spec["precision"],
            execution_provider=spec["execution_provider"],
            adapter_mode=spec.get("adapter_mode") if spec.get("adapters") else None,
            quantization=spec.get("quantization") or {},
            gate=spec.get("gate") or {},
            queue=job.queue,
            parent_id=job.parent_id,
            progress=Progress(
                step=job.step,
                total_steps=total,
                percent=round(100.0 * job.step / total, 1) if total else None,
            ),
            result_files=list(job.result_files or []),
            result=job.result,
            metadata=job.user_metadata,
        )


class ExportJobEventObject(FineTuningJobEventObject):
    object: Literal["export.job.event"] = "export.job.event"

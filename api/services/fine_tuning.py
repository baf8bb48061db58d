"""Fine-tuning jobs: creation (validated up front), reads, cancel. Never commits."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas.fine_tuning import CreateFineTuningJob
from api.services import jobs
from api.services.pagination import page
from models.config import get_settings
from models.datasets import DatasetSummary, check_template_against
from models.errors import GroveError, InvalidRequest
from models.file import File
from models.job import Checkpoint, Job, JobEvent
from models.job_status import TERMINAL, JobStatus
from models.model_store import resolve_model
from models.project import Project
from models.queue import dispatch_after_commit
from models.specs import AdapterConfig, FineTuneSpec
from models.transitions import add_event, switch_job_status


class TooManyJobs(GroveError):
    status_code = 429
    type = "rate_limit_error"
    code = "too_many_jobs"


def _dataset_file(session: Session, project: Project, file_id: str, param: str) -> File:
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == project.id))
    if file is None:
        raise InvalidRequest(f"No file found with id {file_id!r}.", param=param, code="file_not_found")
    if file.purpose != "fine-tune" or file.data_format is None:
        raise InvalidRequest(f"File {file_id} does not have purpose 'fine-tune'.", param=param)
    return file


def _check_template(request: CreateFineTuningJob, file: File, param: str) -> None:
    if file.data_format == "fields":
        if not request.text_template:
            raise InvalidRequest(
                f"The {param} holds arbitrary fields ({', '.join(file.fields or [])}); "
                "a text_template is required to render them.",
                param="text_template",
            )
        summary = DatasetSummary(format="fields", n_examples=file.n_examples or 0, fields=file.fields or [])
        check_template_against(request.text_template, summary, param)
    elif request.text_template:
        raise InvalidRequest(
            f"text_template applies only to files of arbitrary fields; the {param} is {file.data_format} data.",
            param="text_template",
        )


def create(session: Session, project: Project, request: CreateFineTuningJob) -> Job:
    settings = get_settings()
    base = resolve_model(request.model)
    training = _dataset_file(session, project, request.training_file, "training_file")
    _check_template(request, training, "training_file")
    validation = None
    if request.validation_file:
        validation = _dataset_file(session, project, request.validation_file, "validation_file")
        _check_template(request, validation, "validation_file")

    adapter = request.adapter or AdapterConfig()
    if adapter.r > base.max_lora_rank:
        raise InvalidRequest(
            f"adapter.r={adapter.r} exceeds the limit of {base.max_lora_rank} for model {base.name}.",
            param="adapter.r",
        )
    spec_fields = {
        "model": base.name,
        "training_file": training.id,
        "validation_file": validation.id if validation else None,
        "hyperparameters": request.effective_hyperparameters(),
        "adapter": adapter,
        "max_steps": request.max_steps,
        "learning_rate": request.learning_rate,
        "text_template": request.text_template,
    }
    if request.seed is not None:
        spec_fields["seed"] = request.seed
    if request.max_seq_len is not None:
        if request.max_seq_len > base.context_length:
            raise InvalidRequest(
                f"max_seq_len={request.max_seq_len} exceeds {base.name}'s context length of {base.context_length}.",
                param="max_seq_len",
            )
        spec_fields["max_seq_len"] = request.max_seq_len
    spec = FineTuneSpec(**spec_fields)

    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.project_id == project.id, Job.status.not_in(sorted(TERMINAL)))
    )
    if active >= settings.max_queued_jobs_per_project:
        raise TooManyJobs(
            f"This project already has {active} unfinished jobs (limit {settings.max_queued_jobs_per_project})."
        )

    job = Job(
        project_id=project.id,
        kind="fine_tune",
        queue=settings.fine_tune_queue,
        model=base.name,
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        spec=spec.model_dump(mode="json"),
        hyperparameters=spec.hyperparameters.model_dump(mode="json"),
        suffix=request.suffix,
        user_metadata=request.metadata,
        status=JobStatus.validating_files,
    )
    session.add(job)
    session.flush()
    add_event(session, job.id, "created", f"Created fine-tuning job: {job.id}")
    # The files were validated line by line at upload and the template checked above.
    switch_job_status(session, job.id, JobStatus.queued, message="Validated training file; job queued.")
    dispatch_after_commit(session, job.id, job.kind, job.queue)
    session.flush()
    session.refresh(job)
    return job


KIND = "fine_tune"


def get(session: Session, project: Project, job_id: str) -> Job:
    return jobs.get(session, project, job_id, KIND)


def list_jobs(session: Session, project: Project, after: str | None, limit: int) -> tuple[list[Job], bool]:
    return jobs.list_of_kind(session, project, KIND, after, limit)


def cancel(session: Session, project: Project, job_id: str) -> Job:
    return jobs.cancel(session, project, job_id, KIND)


def list_events(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    return jobs.list_events(session, project, job_id, KIND, after, limit)


def list_checkpoints(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> tuple[Job, list[Checkpoint], bool]:
    job = get(session, project, job_id)
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id)
    rows, has_more = page(session, stmt, Checkpoint.id, after, limit)
    return job, rows, has_more

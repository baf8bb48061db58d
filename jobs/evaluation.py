"""Evaluation jobs: every check of a request (data, metrics, targets) and creation, plus the automatic
evaluation a fine-tune asks for. Never commits.

Every target is resolved here, once: the stored spec says exactly which model, adapter archive or ONNX
package each one is, so the worker (worker/evaluate.py) never interprets a request.
"""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import checkpoints, lifecycle
from jobs.evaluation_data import label_set, read_items
from jobs.evaluation_spec import CreateEvaluation, EvaluationSettings, EvaluationSpec, Target, TargetRequest
from models.config import get_settings
from models.datasets import template_fields
from models.errors import InvalidRequest
from models.file import File
from models.job import Checkpoint, Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.project import Project
from models.storage import get_storage


def check_settings(file: File, settings: EvaluationSettings, param: str = "evaluation_file") -> None:
    """Refuse data that cannot be scored and metrics that do not fit it (400 naming the field)."""
    if settings.text_template:
        template_fields(settings.text_template)  # whatever the file holds, a template must be plain fields
    try:
        with get_storage().local_copy(file.storage_key) as path:
            items = read_items(path, settings)
    except InvalidRequest as exc:
        if exc.param in ("evaluation_file", "file"):
            exc.param = param
            exc.message = exc.message.replace("evaluation_file", param)
        raise
    if "accuracy" in settings.metrics:
        label_set(items, settings)


def check_follow_up(
    settings: EvaluationSettings | None, validation: File | None, text_template: str | None
) -> EvaluationSettings | None:
    """The automatic evaluation a fine-tuning job asks for (`evaluation`), checked against its validation file."""
    if settings is None:
        return None
    if validation is None:
        raise InvalidRequest(
            "evaluation needs a validation_file: the automatic evaluation scores base model and adapter on it.",
            param="evaluation",
        )
    if settings.text_template is None and validation.data_format == "fields":
        settings = settings.model_copy(update={"text_template": text_template})
    try:
        check_settings(validation, settings, param="validation_file")
    except InvalidRequest as exc:
        if exc.param and not exc.param.startswith("validation_file"):
            exc.param = f"evaluation.{exc.param}"
        raise
    return settings


def _not_found(kind: str, object_id: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"No {kind} found with id {object_id!r}.", param=param, code="target_not_found")


def _succeeded_job(session: Session, project: Project, job_id: str, kind: JobKind, param: str) -> Job:
    label = kind.label
    job = session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project.id, Job.kind == kind))
    if job is None:
        raise _not_found(label, job_id, param)
    if job.status != JobStatus.succeeded:
        raise InvalidRequest(
            f"The {label} {job_id} is {job.status}; only a succeeded {label} can be evaluated.",
            param=param,
            code="target_not_succeeded",
        )
    if not job.result_files:
        raise InvalidRequest(f"The {label} {job_id} published no result to evaluate.", param=param)
    return job


def _shorthand(session: Session, project: Project, value: str) -> TargetRequest:
    if value.startswith("ftckpt-") or f":{checkpoints.STEP_PREFIX}" in value:
        found = checkpoints.find(session, value, project.id)
        if found is None:
            raise _not_found("checkpoint", value, "targets")
        return TargetRequest(fine_tuning_job=found[0].job_id, checkpoint=found[0].id)
    kind = session.scalar(select(Job.kind).where(Job.id == value, Job.project_id == project.id))
    if kind == JobKind.fine_tune:
        return TargetRequest(fine_tuning_job=value)
    if kind == JobKind.export:
        return TargetRequest(export_job=value)
    if kind is not None:
        raise InvalidRequest(f"Job {value} is a {kind} job; it has no model to evaluate.", param="targets")
    return TargetRequest(model=value)


def _parse_target(session: Session, project: Project, raw, param: str) -> TargetRequest:
    if isinstance(raw, str):
        try:
            return _shorthand(session, project, raw)
        except InvalidRequest as exc:
            exc.param = param
            raise
    try:
        return TargetRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if isinstance(p, str) and p.isidentifier())
        message = "Unknown field." if first.get("type") == "extra_forbidden" else first.get("msg", "Invalid target.")
        raise InvalidRequest(
            f"{param}{'.' + where if where else ''}: {message.removeprefix('Value error, ')}",
            param=f"{param}.{where}" if where else param,
        ) from None


def _checkpoint(session: Session, job: Job, wanted: str | int, param: str) -> Checkpoint:
    found = checkpoints.find(session, wanted, job.project_id, job_id=job.id, shared=False)
    if found is None:
        raise _not_found(f"checkpoint of {job.id}", str(wanted), param)
    checkpoint = found[0]
    if checkpoint.file_id is None:
        raise InvalidRequest(f"Checkpoint {checkpoint.id} has no published adapter.", param=param)
    return checkpoint


def _shared_checkpoint_target(request: TargetRequest, checkpoint: Checkpoint, job: Job, param: str) -> Target:
    if checkpoint.file_id is None:
        raise InvalidRequest(f"Checkpoint {checkpoint.id} has no published adapter.", param=param)
    return Target(
        type="fine_tuning_job",
        name=request.name or f"{job.id}:step-{checkpoint.step}",
        model=resolve_model(job.model, param=param).name,
        job_id=job.id,
        checkpoint_id=checkpoint.id,
        step=checkpoint.step,
        file_id=checkpoint.file_id,
    )


def resolve_target(session: Session, project: Project, raw, index: int) -> Target:
    param = f"targets[{index}]"
    request = _parse_target(session, project, raw, param)
    if request.model is not None:
        try:
            base = resolve_model(request.model, param=f"{param}.model")
        except InvalidRequest as exc:
            if isinstance(raw, str):  # a bare string names a model, a job or a checkpoint of this project
                raise InvalidRequest(
                    f"No model, fine-tuning job, export job or checkpoint named {raw!r}. {exc.message}",
                    param=param,
                    code="target_not_found",
                ) from None
            raise
        return Target(type="model", name=request.name or base.name, model=base.name)

    if request.fine_tuning_job is not None and request.checkpoint is not None:
        # Another project's checkpoint shared with this one: only that checkpoint is reachable, not its job.
        owned = session.scalar(select(Job.id).where(Job.id == request.fine_tuning_job, Job.project_id == project.id))
        if owned is None:
            shared = checkpoints.find(session, request.checkpoint, project.id, job_id=request.fine_tuning_job)
            if shared is None:
                raise _not_found(JobKind.fine_tune.label, request.fine_tuning_job, param)
            return _shared_checkpoint_target(request, *shared, f"{param}.checkpoint")

    if request.fine_tuning_job is not None:
        job = _succeeded_job(session, project, request.fine_tuning_job, JobKind.fine_tune, param)
        base = resolve_model(job.model, param=param)
        if request.checkpoint is None:
            return Target(
                type="fine_tuning_job",
                name=request.name or job.id,
                model=base.name,
                job_id=job.id,
                file_id=job.result_files[0],
            )
        checkpoint = _checkpoint(session, job, request.checkpoint, f"{param}.checkpoint")
        return Target(
            type="fine_tuning_job",
            name=request.name or f"{job.id}:step-{checkpoint.step}",
            model=base.name,
            job_id=job.id,
            checkpoint_id=checkpoint.id,
            step=checkpoint.step,
            file_id=checkpoint.file_id,
        )

    job = _succeeded_job(session, project, request.export_job, JobKind.export, param)
    manifest = job.result or {}
    listed = [a for a in manifest.get("adapters") or [] if isinstance(a, dict) and a.get("name")]
    with_files = [a for a in listed if a.get("file")]
    adapter = None
    if request.adapter is not None:
        matches = [a for a in with_files if request.adapter in (a.get("name"), a.get("job_id"))]
        if not matches:
            available = ", ".join(a["name"] for a in with_files) or "none (the adapters are built into the model)"
            raise InvalidRequest(
                f"Export job {job.id} has no adapter {request.adapter!r}; its adapters: {available}.",
                param=f"{param}.adapter",
            )
        adapter = matches[0]
    elif len(with_files) > 1:
        raise InvalidRequest(
            f"Export job {job.id} is a multi-adapter package ({', '.join(a['name'] for a in with_files)}); "
            "name the adapter to evaluate.",
            param=f"{param}.adapter",
        )
    elif with_files:
        adapter = with_files[0]
    base = manifest.get("base_model")
    base_name = job.model or (base.get("name") if isinstance(base, dict) else base) or "unknown"
    name = job.id if adapter is None else f"{job.id}:{adapter['name']}"
    return Target(
        type="export_job",
        name=request.name or name,
        model=base_name,
        job_id=job.id,
        file_id=job.result_files[0],
        adapter=adapter["name"] if adapter else None,
        adapter_file=adapter.get("file") if adapter else None,
    )


def _unique_names(targets: list[Target]) -> list[Target]:
    seen: dict[str, int] = {}
    for target in targets:
        count = seen.get(target.name, 0) + 1
        seen[target.name] = count
        if count > 1:
            target.name = f"{target.name}#{count}"
    return targets


def create(session: Session, project: Project, request: CreateEvaluation) -> Job:
    settings = get_settings()
    file = lifecycle.dataset_file(session, project.id, request.evaluation_file, "evaluation_file")
    targets = _unique_names([resolve_target(session, project, raw, i) for i, raw in enumerate(request.targets)])
    evaluation = EvaluationSettings.model_validate(request.model_dump(include=set(EvaluationSettings.model_fields)))
    check_settings(file, evaluation)
    spec = EvaluationSpec(**evaluation.model_dump(), evaluation_file=file.id, targets=targets)

    lifecycle.check_room(session, project.id)
    return enqueue_evaluation(session, project.id, spec, settings.fine_tune_queue, metadata=request.metadata)


def enqueue_evaluation(
    session: Session, project_id: str, spec: EvaluationSpec, queue: str, parent_id: str | None = None, metadata=None
):
    """Write an evaluation job (queued) and send its message after commit. Never commits."""
    job = Job(
        project_id=project_id,
        kind=JobKind.evaluation,
        queue=queue,
        model=spec.targets[0].model,
        # The evaluation data sits where the file-delete guard looks: an unfinished job keeps its file.
        validation_file_id=spec.evaluation_file,
        spec=spec.model_dump(mode="json"),
        user_metadata=metadata,
        parent_id=parent_id,
    )
    names = ", ".join(t.name for t in spec.targets)
    return lifecycle.enqueue(
        session,
        job,
        detail=f" ({len(spec.targets)} targets: {names})",
        queued="Validated evaluation file and targets; job queued.",
    )


def enqueue_follow_up(session: Session, fine_tune_job, adapter_file_id: str):
    """The automatic evaluation a fine-tuning job asked for: its base model vs its new adapter, on its
    validation file. Called in the transaction that marks the fine-tune succeeded."""
    settings = EvaluationSettings.model_validate(fine_tune_job.spec["evaluation"])
    if settings.text_template is None:
        settings.text_template = fine_tune_job.spec.get("text_template")
    spec = EvaluationSpec(
        **settings.model_dump(),
        evaluation_file=fine_tune_job.validation_file_id,
        targets=[
            Target(type="model", name=fine_tune_job.model, model=fine_tune_job.model),
            Target(
                type="fine_tuning_job",
                name=fine_tune_job.id,
                model=fine_tune_job.model,
                job_id=fine_tune_job.id,
                file_id=adapter_file_id,
            ),
        ],
    )
    return enqueue_evaluation(session, fine_tune_job.project_id, spec, fine_tune_job.queue, parent_id=fine_tune_job.id)

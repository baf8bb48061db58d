"""Export jobs: every check of a request (sources, options, adapter shapes) and creation. Never commits.

An export job turns a base model from the store, optionally with the LoRA adapters of succeeded fine-tuning
jobs (or named checkpoints of them), into an onnxruntime-genai model package (worker/export.py builds it).
The API creates export jobs from requests; the fine-tuning stage creates one as a child job when a fine-tune
whose spec has an `export` section succeeds (`create_chained_export`).

Everything that can be refused is refused here, at creation, with a 4xx naming the field: an unknown
base model, another project's job (404), a job that has not succeeded, a precision the execution
provider cannot run, a DoRA adapter or an unsupported target module outside the merged mode, and
adapters of one multi package that differ in rank or target modules.
"""

from __future__ import annotations

import json
import tarfile

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import checkpoints, lifecycle
from jobs.export_spec import (
    ADAPTER_NAME,
    BUILDER_ARCHITECTURES,
    GATE_DEFAULTS,
    LORA_MODULES,
    PRECISIONS_FOR_PROVIDER,
    AdapterSource,
    CreateExport,
    ExportOptions,
    ExportSource,
    ExportSpec,
    ResolvedAdapter,
    export_queue,
)
from models.errors import InvalidRequest, NotFound
from models.file import File
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.model_store import BaseModelInfo, resolve_model
from models.storage import get_storage
from models.transitions import add_event


def check_options(options: ExportOptions, n_adapters: int, param_prefix: str = "") -> ExportOptions:
    """Refuse combinations the builder cannot make; fill adapter_mode and the gate thresholds."""
    allowed = PRECISIONS_FOR_PROVIDER[options.execution_provider]
    if options.precision not in allowed:
        raise InvalidRequest(
            f"precision {options.precision} cannot run on execution_provider {options.execution_provider}; "
            f"choose one of {', '.join(allowed)}.",
            param=f"{param_prefix}precision",
        )
    mode = options.adapter_mode
    if n_adapters == 0:
        if mode is not None:
            raise InvalidRequest(
                "adapter_mode applies only to exports with adapters; this export has none.",
                param=f"{param_prefix}adapter_mode",
            )
    elif mode is None:
        mode = "merged" if n_adapters == 1 else "multi"
    elif n_adapters > 1 and mode != "multi":
        raise InvalidRequest(
            f"{n_adapters} adapters need adapter_mode multi (one base model, one .onnx_adapter each); "
            f"{mode} takes exactly one.",
            param=f"{param_prefix}adapter_mode",
        )
    min_match, max_diff = GATE_DEFAULTS[options.precision]
    gate = options.gate.model_copy(
        update={
            "min_token_match": options.gate.min_token_match if options.gate.min_token_match is not None else min_match,
            "max_mean_abs_logit_diff": options.gate.max_mean_abs_logit_diff or max_diff,
        }
    )
    return options.model_copy(update={"adapter_mode": mode, "gate": gate})


def check_architecture(base: BaseModelInfo, param: str) -> None:
    """Refuse a base model whose architecture the onnxruntime-genai model builder has no recipe for."""
    if base.architecture not in BUILDER_ARCHITECTURES:
        raise InvalidRequest(
            f"Model {base.name!r} is a {base.architecture or 'model of unknown architecture'}, which the "
            f"onnxruntime-genai model builder cannot export (it builds {', '.join(sorted(BUILDER_ARCHITECTURES))}).",
            param=param,
            code="unsupported_model",
        )


def read_adapter_config(file: File) -> dict:
    """adapter_config.json from a published adapter archive (a flat tar, see worker/fine_tune.pack_adapter)."""
    try:
        with get_storage().local_copy(file.storage_key) as path, tarfile.open(path) as tar:
            member = tar.extractfile("adapter_config.json")
            if member is None:
                raise KeyError("adapter_config.json")
            return json.loads(member.read())
    except (OSError, KeyError, tarfile.TarError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            f"File {file.id} is not a readable adapter archive ({exc.__class__.__name__}).", code="invalid_adapter"
        ) from None


def _target_modules(config: dict) -> list[str]:
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # a regular expression: kept as given
        return [modules]
    return sorted({str(m) for m in modules})


def resolve_adapter(
    session: Session, project_id: str, source: AdapterSource, param: str
) -> tuple[ResolvedAdapter, Job]:
    """Find the job (404 if not this project's) and its adapter archive; read rank and target modules.

    Another project's job is reachable only through one of its checkpoints shared with this project: then that
    checkpoint's archive is used, and nothing else of the job (its suffix names no adapter here)."""
    job = session.scalar(
        select(Job).where(Job.id == source.fine_tuning_job, Job.project_id == project_id, Job.kind == JobKind.fine_tune)
    )
    shared = False
    if job is None and source.checkpoint is not None:
        found = checkpoints.find(session, source.checkpoint, project_id, job_id=source.fine_tuning_job)
        if found is not None:
            job, shared = found[1], True
    if job is None:
        raise NotFound("fine-tuning job", source.fine_tuning_job, param=f"{param}.fine_tuning_job")
    step = job.step or None
    checkpoint_id = None
    if source.checkpoint is not None:
        found = checkpoints.find(session, source.checkpoint, project_id, job_id=job.id)
        if found is None:
            raise NotFound("checkpoint", source.checkpoint, param=f"{param}.checkpoint")
        checkpoint = found[0]
        if checkpoint.file_id is None:
            raise InvalidRequest(
                f"Checkpoint {checkpoint.id} of {job.id} has no published adapter.", param=f"{param}.checkpoint"
            )
        file_id, step, checkpoint_id = checkpoint.file_id, checkpoint.step, checkpoint.id
    else:
        if job.status != JobStatus.succeeded or not job.result_files:
            raise InvalidRequest(
                f"Fine-tuning job {job.id} is {job.status}; only a succeeded job's adapter can be exported "
                "(or name one of its checkpoints).",
                param=f"{param}.fine_tuning_job",
                code="job_not_succeeded",
            )
        file_id = job.result_files[0]
    # A shared checkpoint's archive is the owner's file: the checkpoint row vouches for it.
    owner = job.project_id if shared else project_id
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == owner))
    if file is None:
        raise InvalidRequest(
            f"The adapter file {file_id} of {job.id} was deleted.",
            param=f"{param}.fine_tuning_job",
            code="file_not_found",
        )
    config = read_adapter_config(file)
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidRequest(
            f"The adapter of {job.id} is {config.get('peft_type')}; only LoRA/DoRA adapters export.",
            param=f"{param}.fine_tuning_job",
        )
    name = source.name
    if name is None:
        name = job.id if shared else (job.suffix or job.id)
        if source.checkpoint is not None:
            name = f"{name}-step-{step}"
    if not ADAPTER_NAME.match(name):
        raise InvalidRequest(
            f"Adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'.", param=f"{param}.name"
        )
    resolved = ResolvedAdapter(
        name=name,
        fine_tuning_job=job.id,
        checkpoint=checkpoint_id,
        step=step,
        file_id=file.id,
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha", config["r"])),
        target_modules=_target_modules(config),
        use_dora=bool(config.get("use_dora", False)),
    )
    return resolved, job


def check_adapters(adapters: list[ResolvedAdapter], mode: str | None, param_prefix: str = "source.") -> None:
    """What the separate and multi modes cannot carry, and a multi package's shared rank and modules."""
    for i, adapter in enumerate(adapters):
        param = f"{param_prefix}adapters[{i}].fine_tuning_job"
        if mode in ("separate", "multi"):
            if adapter.use_dora:
                raise InvalidRequest(
                    f"The adapter of {adapter.fine_tuning_job} is DoRA, which only exports with adapter_mode merged.",
                    param=param,
                    code="unsupported_adapter",
                )
            unsupported = [m for m in adapter.target_modules if m.rsplit(".", 1)[-1] not in LORA_MODULES]
            if unsupported:
                raise InvalidRequest(
                    f"The adapter of {adapter.fine_tuning_job} adapts {', '.join(unsupported)}; adapter_mode "
                    f"{mode} supports {', '.join(LORA_MODULES)} (use merged for others).",
                    param=param,
                    code="unsupported_adapter",
                )
    names: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        if adapter.name in names:
            raise InvalidRequest(
                f"Two adapters are named {adapter.name!r}; give each a distinct name.",
                param=f"{param_prefix}adapters[{i}].name",
            )
        names[adapter.name] = i
    if mode == "multi" and adapters:
        first = adapters[0]
        for i, adapter in enumerate(adapters[1:], start=1):
            if adapter.rank != first.rank or adapter.target_modules != first.target_modules:
                raise InvalidRequest(
                    f"Adapter of fine-tuning job {adapter.fine_tuning_job} has rank {adapter.rank} and target "
                    f"modules {adapter.target_modules}, but {first.fine_tuning_job} has rank {first.rank} and "
                    f"{first.target_modules}: adapters of one multi package must share rank and target modules.",
                    param=f"{param_prefix}adapters[{i}].fine_tuning_job",
                    code="adapter_mismatch",
                )


def build_spec(session: Session, project_id: str, source: ExportSource, options: ExportOptions) -> ExportSpec:
    """Resolve and check a request's source and options into the spec the worker runs."""
    options = check_options(options, len(source.adapters))
    adapters: list[ResolvedAdapter] = []
    base_name = None
    for i, adapter_source in enumerate(source.adapters):
        resolved, job = resolve_adapter(session, project_id, adapter_source, f"source.adapters[{i}]")
        if base_name is None:
            base_name = job.model
        elif job.model != base_name:
            raise InvalidRequest(
                f"Fine-tuning job {job.id} trained on {job.model}, not {base_name}: one export has one base model.",
                param=f"source.adapters[{i}].fine_tuning_job",
                code="adapter_mismatch",
            )
        adapters.append(resolved)
    if source.model is not None:
        if base_name is not None and source.model != base_name:
            raise InvalidRequest(f"The adapters were trained on {base_name}, not {source.model}.", param="source.model")
        base_name = source.model
    if base_name is None:
        raise InvalidRequest("Give source.model, source.adapters, or both.", param="source.model")
    base = resolve_model(base_name, param="source.model")
    check_architecture(base, "source.model")
    check_adapters(adapters, options.adapter_mode)
    return ExportSpec(**options.model_dump(), model=base.name, adapters=adapters)


def enqueue_export(
    session: Session,
    project_id: str,
    spec: ExportSpec,
    *,
    parent_id: str | None = None,
    metadata: dict | None = None,
) -> Job:
    """Write the job and its events, queue it on its provider's queue; the message goes out after commit."""
    job = Job(
        project_id=project_id,
        kind=JobKind.export,
        queue=export_queue(spec.execution_provider),
        model=spec.model,
        spec=spec.model_dump(mode="json"),
        hyperparameters={},
        user_metadata=metadata,
        parent_id=parent_id,
    )
    what = f"{len(spec.adapters)} adapter(s), {spec.adapter_mode}" if spec.adapters else "base model"
    detail = f" ({spec.model}, {what}, {spec.precision} for {spec.execution_provider})."
    return lifecycle.enqueue(session, job, detail=detail, queued="Sources checked; export queued.")


def create(session: Session, project_id: str, request: CreateExport) -> Job:
    """POST /v1/exports: resolve and check the sources and options, then queue the export."""
    options = ExportOptions.model_validate(request.model_dump(include=set(ExportOptions.model_fields)))
    spec = build_spec(session, project_id, request.source, options)
    lifecycle.check_room(session, project_id)
    return enqueue_export(session, project_id, spec, metadata=request.metadata)


def check_chained_export(options: ExportOptions | None, adapter, base: BaseModelInfo) -> ExportOptions | None:
    """The `export` section of a fine-tuning request, checked against the adapter and base model it will export."""
    if options is None:
        return None
    check_architecture(base, "model")
    options = check_options(options, 1, "export.")
    if options.adapter_mode in ("separate", "multi"):
        if adapter.type == "dora":
            raise InvalidRequest("DoRA adapters only export with adapter_mode merged.", param="export.adapter_mode")
        modules = [] if adapter.target_modules == "all-linear" else list(adapter.target_modules)
        unsupported = [m for m in modules if m.rsplit(".", 1)[-1] not in LORA_MODULES]
        if unsupported:
            raise InvalidRequest(
                f"adapter_mode {options.adapter_mode} supports {', '.join(LORA_MODULES)}, not "
                f"{', '.join(unsupported)} (use merged).",
                param="export.adapter_mode",
            )
    return options


def create_chained_export(session: Session, parent: Job, adapter_file: File) -> Job | None:
    """The export a succeeded fine-tune asked for in its spec, as a child job; in the caller's transaction.

    A problem found now (the options were checked when the fine-tune was created) is recorded as a warning
    event on the fine-tune, which still succeeds.
    """
    section = (parent.spec or {}).get("export")
    if not section:
        return None
    try:
        options = check_options(ExportOptions.model_validate(section), 1, "export.")
        config = read_adapter_config(adapter_file)
        adapter = ResolvedAdapter(
            name=parent.suffix or parent.id,
            fine_tuning_job=parent.id,
            step=session.scalar(select(Job.step).where(Job.id == parent.id)) or None,
            file_id=adapter_file.id,
            rank=int(config["r"]),
            alpha=float(config.get("lora_alpha", config["r"])),
            target_modules=_target_modules(config),
            use_dora=bool(config.get("use_dora", False)),
        )
        check_adapters([adapter], options.adapter_mode, "export.")
        spec = ExportSpec(**options.model_dump(), model=parent.model, adapters=[adapter])
    except (InvalidRequest, ValueError) as exc:
        add_event(
            session,
            parent.id,
            "warning",
            f"The requested export was not created: {getattr(exc, 'message', exc)}",
            level="warn",
        )
        return None
    child = enqueue_export(session, parent.project_id, spec, parent_id=parent.id)
    add_event(
        session,
        parent.id,
        "info",
        f"Export job {child.id} created ({spec.precision}, {spec.execution_provider}, {spec.adapter_mode}).",
        data={"export_job_id": child.id},
    )
    return child

"""Fine-tuning jobs: every check of a request (files, template, base model, adapter, continuation, chained
export and evaluation), and creation. Never commits.

The request and the stored spec are in jobs/fine_tune_spec.py; worker/fine_tune.py runs the job.
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from pathlib import Path

from safetensors import safe_open
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs import checkpoints, evaluation, lifecycle
from jobs.export import check_chained_export
from jobs.fine_tune_spec import (
    COMPLETION_MARKER,
    AdapterConfig,
    CreateFineTuningJob,
    FineTuneSpec,
    TrainingOptions,
    split_at_completion_marker,
)
from models.config import get_settings
from models.datasets import DatasetSummary, check_template_against
from models.errors import InvalidRequest
from models.file import File
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.project import Project


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


def _check_method_data(request: CreateFineTuningJob, file: File, param: str) -> None:
    """A dpo job trains on preference pairs only, a supervised job on anything else. Every line of an uploaded
    file has the shape of its first example (checked at upload), so the first line is the one to name."""
    dpo = request.method_type == "dpo"
    if dpo and file.data_format != "preference":
        raise InvalidRequest(
            f"line 1 of the {param} ({file.id}) is a {file.data_format} example; a dpo job needs preference "
            'examples: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": ...}], '
            '"non_preferred_output": [...]}.',
            param=param,
        )
    if not dpo and file.data_format == "preference":
        raise InvalidRequest(
            f"line 1 of the {param} ({file.id}) is a preference example (input, preferred_output, "
            'non_preferred_output); train on it with method {"type": "dpo"}, or give chat or prompt/completion '
            "data for supervised fine-tuning.",
            param=param,
        )


def _check_method(request: CreateFineTuningJob) -> None:
    """The method's settings sit under its own type's name."""
    if request.method_type != "dpo":
        if request.method and request.method.dpo is not None:
            raise InvalidRequest("method.dpo is given but method.type is supervised.", param="method.dpo")
        return
    if request.method.supervised is not None:
        raise InvalidRequest("method.supervised is given but method.type is dpo.", param="method.supervised")
    if request.hyperparameters is not None:
        raise InvalidRequest(
            "A dpo job takes its hyperparameters in method.dpo.hyperparameters.", param="hyperparameters"
        )


def _check_dpo_adapter(request: CreateFineTuningJob, adapter: AdapterConfig) -> None:
    if request.method_type == "dpo" and adapter.type == "full":
        # The reference model is the base with the adapter switched off: a full fine-tune has no such switch
        # and would need a second copy of the model.
        raise InvalidRequest(
            "adapter.type full is not offered with method dpo: the reference model is the base model with the "
            "adapter switched off; use lora, qlora or dora.",
            param="adapter.type",
        )


def _weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from the safetensors headers (no weights loaded, no torch)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as weights:
            shapes |= {name: weights.get_slice(name).get_shape() for name in weights.keys()}  # noqa: SIM118
    return shapes


def model_modules(model_dir: Path) -> dict[str, int]:
    """Module name -> rank of its weight (2: linear or embedding, which LoRA can adapt; 1: a norm)."""
    modules = {
        name.rsplit(".", 1)[0]: len(shape)
        for name, shape in _weight_shapes(model_dir).items()
        if name.endswith(".weight")
    }
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("tie_word_embeddings", True) and "lm_head" not in modules:
        modules["lm_head"] = 2  # tied to the input embeddings: not stored, but a module all the same
    return modules


def _check_modules(names: list[str], modules: dict[str, int], param: str, adaptable: bool) -> None:
    """Every name must match a module as peft matches them: the full name, or its last dotted parts."""
    for name in names:
        found = [m for m in modules if m == name or m.endswith("." + name)]
        if not found:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules if modules[m] == 2})
            raise InvalidRequest(
                f"{param}: the model has no module {name!r}. Linear and embedding modules: {', '.join(leaves)}.",
                param=param,
            )
        if adaptable and any(modules[m] != 2 for m in found):
            raise InvalidRequest(
                f"{param}: {name!r} is not a linear or embedding module; a low-rank adapter cannot wrap it.",
                param=param,
            )


def _continued_from(
    session: Session, project: Project, request: CreateFineTuningJob, model: str
) -> tuple[dict, str | None] | None:
    """The spec of the job whose adapter this one continues (from_job, or from_checkpoint's job), and the id of
    the checkpoint (None for from_job). from_checkpoint may name a checkpoint shared with this project."""
    if request.from_job and request.from_checkpoint:
        raise InvalidRequest("Give from_job or from_checkpoint, not both.", param="from_checkpoint")
    checkpoint_id = None
    if request.from_checkpoint:
        found = checkpoints.find(session, request.from_checkpoint, project.id)
        if found is None or found[0].file_id is None:
            raise InvalidRequest(
                f"No checkpoint found with id {request.from_checkpoint!r}.", param="from_checkpoint", code="not_found"
            )
        (checkpoint, source), param = found, "from_checkpoint"
        checkpoint_id = checkpoint.id
    elif request.from_job:
        source = session.scalar(
            select(Job).where(Job.id == request.from_job, Job.project_id == project.id, Job.kind == JobKind.fine_tune)
        )
        if source is None:
            raise InvalidRequest(f"No fine-tuning job found with id {request.from_job!r}.", param="from_job")
        if source.status != JobStatus.succeeded or not source.result_files:
            raise InvalidRequest(
                f"Job {source.id} has status {source.status}; only a succeeded job's adapter can be continued.",
                param="from_job",
            )
        param = "from_job"
    else:
        return None
    if source.model != model:
        raise InvalidRequest(
            f"{param} trained {source.model}, not {model}: an adapter continues on its own base model.", param=param
        )
    return source.spec, checkpoint_id


def _check_adapter(request: CreateFineTuningJob, source: dict | None, base) -> AdapterConfig:
    adapter = request.adapter
    given = "adapter" in request.model_fields_set
    if source is not None:
        inherited = AdapterConfig.model_validate(source["adapter"])
        if given:
            # What the saved weights fix (their type family, rank, scale and modules) cannot change.
            family = {"lora": "lora", "qlora": "lora", "dora": "dora", "full": "full"}
            param = "from_job" if request.from_job else "from_checkpoint"
            for name in ("type", "r", "alpha", "target_modules", "modules_to_save"):
                mine, theirs = getattr(adapter, name), getattr(inherited, name)
                same = family[mine] == family[theirs] if name == "type" else mine == theirs
                explicit = name in adapter.model_fields_set
                if explicit and not same:
                    raise InvalidRequest(
                        f"adapter.{name}={mine!r} differs from the {theirs!r} of the adapter that {param} continues.",
                        param=f"adapter.{name}",
                    )
            adapter = inherited.model_copy(update={k: getattr(adapter, k) for k in adapter.model_fields_set})
        else:
            adapter = inherited
    if adapter.type != "full" and adapter.r > base.max_lora_rank:
        raise InvalidRequest(
            f"adapter.r={adapter.r} exceeds the limit of {base.max_lora_rank} for model {base.name}.",
            param="adapter.r",
        )
    if adapter.type == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidRequest(
            "adapter.type qlora needs the bitsandbytes package, which this server does not have; use lora.",
            param="adapter.type",
        )
    if adapter.type != "full":
        modules = model_modules(base.path)
        if adapter.target_modules != "all-linear":
            _check_modules(adapter.target_modules, modules, "adapter.target_modules", adaptable=True)
        if adapter.modules_to_save:
            _check_modules(adapter.modules_to_save, modules, "adapter.modules_to_save", adaptable=False)
    return adapter


def _check_options(request: CreateFineTuningJob, validation: File | None) -> None:
    if request.early_stopping_patience is not None and validation is None:
        raise InvalidRequest(
            "early_stopping_patience needs a validation_file: it watches the validation loss.",
            param="early_stopping_patience",
        )
    if request.text_template and COMPLETION_MARKER in request.text_template:
        if request.text_template.count(COMPLETION_MARKER) > 1:
            raise InvalidRequest(f"text_template may hold {COMPLETION_MARKER} only once.", param="text_template")
        prompt, completion = split_at_completion_marker(request.text_template)
        if not completion.strip():
            raise InvalidRequest(
                f"text_template has nothing after {COMPLETION_MARKER}: there would be no text to train on.",
                param="text_template",
            )


def draw_seed() -> int:
    """A seed for a request that gave none, in the range the request field takes."""
    return secrets.randbelow(2**31)


def create(session: Session, project: Project, request: CreateFineTuningJob) -> Job:
    settings = get_settings()
    base = resolve_model(request.model)
    _check_method(request)
    training = lifecycle.dataset_file(session, project.id, request.training_file, "training_file")
    _check_method_data(request, training, "training_file")
    _check_template(request, training, "training_file")
    validation = None
    if request.validation_file:
        validation = lifecycle.dataset_file(session, project.id, request.validation_file, "validation_file")
        _check_method_data(request, validation, "validation_file")
        _check_template(request, validation, "validation_file")

    continued = _continued_from(session, project, request, base.name)
    source = continued[0] if continued else None
    adapter = _check_adapter(request, source, base)
    _check_dpo_adapter(request, adapter)
    _check_options(request, validation)
    options = request.model_dump(include=set(TrainingOptions.model_fields) - {"adapter", "max_seq_len"})
    spec_fields = {
        **options,
        "model": base.name,
        "training_file": training.id,
        "validation_file": validation.id if validation else None,
        "hyperparameters": request.effective_hyperparameters(),
        "adapter": adapter,
        "max_seq_len": min(FineTuneSpec.model_fields["max_seq_len"].default, base.context_length),
        "export": check_chained_export(request.export, adapter, base),
        "evaluation": evaluation.check_follow_up(request.evaluation, validation, request.text_template),
        "dpo": request.dpo_settings(),
    }
    if continued and continued[1]:
        spec_fields["from_checkpoint"] = continued[1]  # the id, whichever name the request gave
    # As OpenAI does: an omitted seed is drawn, and recorded, so the job can be rerun exactly.
    spec_fields["seed"] = request.seed if request.seed is not None else draw_seed()
    if request.max_seq_len is not None:
        if request.max_seq_len > base.context_length:
            raise InvalidRequest(
                f"max_seq_len={request.max_seq_len} exceeds {base.name}'s context length of {base.context_length}.",
                param="max_seq_len",
            )
        spec_fields["max_seq_len"] = request.max_seq_len
    spec = FineTuneSpec(**spec_fields)

    lifecycle.check_room(session, project.id)
    job = Job(
        project_id=project.id,
        kind=JobKind.fine_tune,
        queue=settings.fine_tune_queue,
        model=base.name,
        training_file_id=training.id,
        validation_file_id=validation.id if validation else None,
        spec=spec.model_dump(mode="json"),
        hyperparameters=spec.hyperparameters.model_dump(mode="json") | ({"beta": spec.dpo.beta} if spec.dpo else {}),
        suffix=request.suffix,
        user_metadata=request.metadata,
    )
    # The files were validated line by line at upload and the template checked above.
    return lifecycle.enqueue(session, job, queued="Validated training file; job queued.")

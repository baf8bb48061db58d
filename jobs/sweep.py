"""Sweeps: every check of a request (the space, the objective, and each trial's fine-tuning request), creation
and cancel. Never commits.

A sweep is written queued and sent nowhere: no worker runs it. The reconciler (worker/sweep.py) claims it,
creates its trials as fine-tuning jobs, and finishes it.
"""

from __future__ import annotations

import math

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs import evaluation, fine_tune, lifecycle
from jobs.evaluation_spec import EvaluationSettings
from jobs.fine_tune_spec import CreateFineTuningJob
from jobs.sweep_spec import (
    DEFAULT_RANDOM_TRIALS,
    MAX_GRID_SIZE,
    SWEEP_META,
    TRIAL_META,
    CreateSweep,
    SweepObjective,
    SweepSpec,
    apply_params,
    check_parameter,
    first_values,
    grid_values,
    loc_param,
)
from models.config import get_settings
from models.errors import GroveError, InvalidRequest
from models.file import File
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.project import Project


def _check_space(request: CreateSweep) -> tuple[dict[str, str], int]:
    """Each parameter known and well formed, none searched twice; returns (name -> path, num_trials)."""
    parameters: dict[str, str] = {}
    for name, p in request.search_space.items():
        path = check_parameter(name, p)
        twice = next((other for other, known in parameters.items() if known == path), None)
        if twice is not None:
            raise InvalidRequest(
                f"search_space.{name}: {path} is already searched as {twice!r}.", param=f"search_space.{name}"
            )
        if request.strategy != "grid" and p.grid_points is not None:
            raise InvalidRequest(
                f"search_space.{name}: grid_points applies to strategy grid, not {request.strategy}.",
                param=f"search_space.{name}",
            )
        parameters[name] = path

    if request.strategy == "grid":
        size = math.prod(len(grid_values(name, p)) for name, p in request.search_space.items())
        if size > MAX_GRID_SIZE:
            raise InvalidRequest(
                f"The grid has {size} combinations (at most {MAX_GRID_SIZE}); use fewer values.", param="search_space"
            )
        num_trials = request.num_trials or size
        if num_trials > size:
            raise InvalidRequest(
                f"num_trials={num_trials}, but the grid has only {size} combinations.", param="num_trials"
            )
    else:
        num_trials = request.num_trials or DEFAULT_RANDOM_TRIALS

    limit = get_settings().max_queued_jobs_per_project
    if num_trials > limit:
        raise InvalidRequest(
            f"num_trials={num_trials} is more trials than this project may queue (at most {limit} unfinished jobs).",
            param="num_trials",
        )
    if request.max_parallel >= limit:
        raise InvalidRequest(
            f"max_parallel={request.max_parallel}: a project may hold at most {limit} unfinished jobs, the sweep "
            "included.",
            param="max_parallel",
        )
    return parameters, num_trials


def _check_objective(session: Session, project: Project, request: CreateSweep) -> tuple[SweepObjective, File | None]:
    objective = request.objective
    base = request.fine_tuning
    if not objective.uses_evaluation:
        if base.validation_file is None:
            raise InvalidRequest(
                "objective.metric valid_loss needs fine_tuning.validation_file: trials are scored by their "
                "validation loss.",
                param="objective.metric",
            )
        if objective.evaluation_file or objective.evaluation:
            raise InvalidRequest(
                "objective.evaluation_file and objective.evaluation apply to evaluation metrics, not valid_loss.",
                param="objective.evaluation_file",
            )
        return objective, None

    if objective.evaluation_file is None:
        raise InvalidRequest(
            f"objective.metric {objective.metric} is an evaluation metric: give objective.evaluation_file, the file "
            "each trial's adapter is scored on.",
            param="objective.evaluation_file",
        )
    file = session.scalar(select(File).where(File.id == objective.evaluation_file, File.project_id == project.id))
    if file is None or file.purpose != "fine-tune" or file.data_format is None:
        raise InvalidRequest(
            f"No uploaded dataset found with id {objective.evaluation_file!r}.",
            param="objective.evaluation_file",
            code="file_not_found",
        )
    settings = objective.evaluation or EvaluationSettings()
    # The objective's metric, plus any the request asks for besides (not the evaluation defaults).
    asked = settings.metrics if "metrics" in settings.model_fields_set else []
    metrics = list(dict.fromkeys([objective.metric, *asked]))
    settings = settings.model_copy(update={"metrics": metrics})
    if settings.text_template is None and file.data_format == "fields":
        settings = settings.model_copy(update={"text_template": base.text_template})
    try:
        evaluation.check_settings(file, settings, param="objective.evaluation_file")
    except InvalidRequest as exc:
        if exc.param and not exc.param.startswith("objective."):
            exc.param = f"objective.evaluation.{exc.param}"
        raise
    return objective.model_copy(update={"evaluation": settings}), file


def _blame(exc: GroveError, parameters: dict[str, str], values: dict, varied: str | None) -> GroveError:
    """Point an error about a trial's request at the searched parameter it is about, else at fine_tuning."""
    param = (exc.param or "").removeprefix("method.supervised.")
    named = next((name for name, path in parameters.items() if param == path or param.startswith(path + ".")), None)
    if named is None and varied is not None:
        named = varied
    if named is not None:
        exc.message = f"search_space.{named}={values[named]!r} makes a refused fine-tuning request: {exc.message}"
        exc.param = f"search_space.{named}"
    else:
        exc.param = f"fine_tuning.{exc.param}" if exc.param else "fine_tuning"
    return exc


def _dry_run(
    session: Session, project: Project, base: dict, parameters: dict[str, str], values: dict, varied: str | None
) -> str:
    """Would POST /v1/fine_tuning/jobs accept this trial? Creates the job as a trial would be created, then
    removes it (row, events and its pending dispatch). Returns the resolved base model."""
    body = apply_params(base, parameters, values)
    try:
        request = CreateFineTuningJob.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = loc_param(tuple(first.get("loc", ())))
        raise _blame(InvalidRequest(f"{param}: {first.get('msg')}", param=param), parameters, values, varied) from None
    try:
        job = fine_tune.create(session, project, request)
    except GroveError as exc:
        if exc.status_code >= 500 or exc.status_code == 429:
            raise
        raise _blame(exc, parameters, values, varied) from None
    model, job_id = job.model, job.id
    pending = session.info.get("dispatch_after_commit")
    if pending:
        pending[:] = [entry for entry in pending if entry[0] != job_id]
    session.execute(delete(JobEvent).where(JobEvent.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
    return model


def create(session: Session, project: Project, request: CreateSweep) -> Job:
    settings = get_settings()
    parameters, num_trials = _check_space(request)
    objective, evaluation_file = _check_objective(session, project, request)
    base = request.fine_tuning.model_dump(mode="json", exclude_unset=True)
    if base.get("seed") is None and "seed" not in request.search_space:
        base["seed"] = fine_tune.draw_seed()  # drawn once: the trials differ only in what is searched
    if len((base.get("metadata") or {}) | {SWEEP_META: "", TRIAL_META: ""}) > 16:
        raise InvalidRequest(
            f"fine_tuning.metadata: trials add {SWEEP_META} and {TRIAL_META}; give at most 14 entries.",
            param="fine_tuning.metadata",
        )

    # Every trial is a fine-tuning request: try the base request with each parameter at its ends (or each of
    # its values), so that a value the fine-tuning API would refuse is refused now, naming the parameter.
    probes = first_values(request.search_space, request.strategy)
    first = {name: values[0] for name, values in probes.items()}
    model = _dry_run(session, project, base, parameters, first, None)
    for name, values in probes.items():
        for value in values[1:]:
            _dry_run(session, project, base, parameters, first | {name: value}, name)

    lifecycle.check_room(session, project.id)

    spec = SweepSpec(
        **request.model_dump(exclude={"fine_tuning", "metadata", "num_trials", "objective"}),
        objective=objective,
        fine_tuning=base,
        parameters=parameters,
        num_trials=num_trials,
        direction=objective.resolved_direction,
    )
    job = Job(
        project_id=project.id,
        kind=JobKind.sweep,
        queue=settings.fine_tune_queue,
        model=model,
        # The files sit where the file-delete guard looks: an unfinished sweep keeps them.
        training_file_id=request.fine_tuning.training_file,
        validation_file_id=request.fine_tuning.validation_file or (evaluation_file.id if evaluation_file else None),
        spec=spec.model_dump(mode="json"),
        hyperparameters={},
        user_metadata=request.metadata,
        total_steps=num_trials,
        step=0,
    )
    # No worker runs a sweep: the reconciler (worker/sweep.py) advances it, so no message is sent.
    return lifecycle.enqueue(
        session,
        job,
        detail=f" ({spec.strategy}, {num_trials} trials over {', '.join(parameters)}).",
        queued="Sweep queued; the reconciler starts its trials.",
        dispatch=False,
    )


def cancel(session: Session, sweep: Job) -> Job:
    """Cancel the sweep and, in the same transaction, its queued and running trials (and their evaluations).
    The reconciler marks the sweep cancelled once every trial has stopped."""
    job = lifecycle.cancel(session, sweep)
    if job.status in (JobStatus.cancelling, JobStatus.cancelled):
        lifecycle.cancel_children(session, job.id, f"Sweep {job.id} was cancelled.")
        session.flush()
    return job

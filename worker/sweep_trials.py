"""A sweep's trials as jobs: which fine-tuning job (and evaluation job) is which trial, what they reported, and
the objective a finished trial scored. Read and written inside the sweep pass's transaction (worker/sweep.py)."""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.evaluation import enqueue_evaluation
from jobs.evaluation_spec import EvaluationSettings, EvaluationSpec, Target
from jobs.sweep_spec import SWEEP_META, TRIAL_META, SweepSpec
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.job_status import TERMINAL, JobStatus
from models.transitions import add_event


def trial_jobs(session: Session, sweep_id: str) -> tuple[dict[int, Job], dict[str, Job]]:
    """The sweep's trials (optuna trial number -> fine-tuning job) and their evaluations (trial job id -> job)."""
    children = session.scalars(
        select(Job).where(Job.parent_id == sweep_id, Job.kind == JobKind.fine_tune).order_by(Job.id)
    ).all()
    trials: dict[int, Job] = {}
    for child in children:
        number = (child.user_metadata or {}).get(TRIAL_META)
        if number is not None and str(number).isdigit():
            trials[int(number)] = child
    evaluations: dict[str, Job] = {}
    if children:
        for job in session.scalars(
            select(Job)
            .where(Job.parent_id.in_([c.id for c in children]), Job.kind == JobKind.evaluation)
            .order_by(Job.id)
        ):
            if (job.user_metadata or {}).get(SWEEP_META) == sweep_id:
                evaluations[job.parent_id] = job
    return trials, evaluations


def valid_losses(session: Session, job_ids: list[str]) -> dict[str, dict[int, float]]:
    """Validation losses from the trials' metrics events: job id -> {step: loss}."""
    out: dict[str, dict[int, float]] = {job_id: {} for job_id in job_ids}
    if not job_ids:
        return out
    rows = session.execute(
        select(JobEvent.job_id, JobEvent.data)
        .where(JobEvent.job_id.in_(job_ids), JobEvent.type == "metrics")
        .order_by(JobEvent.id)
    ).all()
    for job_id, data in rows:
        if not isinstance(data, dict):
            continue
        step, loss = data.get("step"), data.get("valid_loss")
        if isinstance(step, int) and isinstance(loss, int | float):
            out[job_id][step] = float(loss)
    return out


def needs_evaluation(spec: SweepSpec, child: Job, evaluation: Job | None) -> bool:
    """A trial that trained and published its adapter, whose objective is scored by an evaluation not yet started."""
    return spec.objective.uses_evaluation and evaluation is None and bool(child.result_files)


def trial_objective(spec: SweepSpec, child: Job, evaluation: Job | None) -> tuple[str, float | None, str | None]:
    """What a succeeded trial scored: ("ok", value, None), ("pending", None, None) or ("failed", None, why)."""
    if not spec.objective.uses_evaluation:
        result = child.result or {}
        best = result.get("best_valid_loss")
        use_best = (child.spec or {}).get("result_adapter", "best") == "best" and best is not None
        value = best if use_best else result.get("valid_loss")
        if not isinstance(value, int | float):
            return "failed", None, "the trial reported no validation loss"
        return "ok", float(value), None
    if evaluation is None:
        return "failed", None, "the trial published no adapter to evaluate"
    if evaluation.status not in TERMINAL:
        return "pending", None, None
    if evaluation.status != JobStatus.succeeded:
        why = (evaluation.error or {}).get("message") or f"its evaluation job was {evaluation.status}"
        return "failed", None, f"evaluation {evaluation.id}: {why}"
    metric = spec.objective.metric
    targets = (evaluation.result or {}).get("targets") or [{}]
    value = (targets[0].get("metrics") or {}).get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "failed", None, f"evaluation {evaluation.id} reported no {metric}"
    return "ok", float(value), None


def start_evaluation(session: Session, sweep: Job, spec: SweepSpec, number: int, child: Job) -> Job:
    """Queue the evaluation job that scores trial `number`'s adapter, and say so on the sweep."""
    objective = spec.objective
    settings = EvaluationSettings.model_validate(
        objective.evaluation.model_dump() if objective.evaluation else {"metrics": [objective.metric]}
    )
    evaluation_spec = EvaluationSpec(
        **settings.model_dump(),
        evaluation_file=objective.evaluation_file,
        targets=[
            Target(
                type="fine_tuning_job",
                name=child.id,
                model=child.model,
                job_id=child.id,
                file_id=child.result_files[0],
            )
        ],
    )
    evaluation = enqueue_evaluation(
        session,
        sweep.project_id,
        evaluation_spec,
        sweep.queue,
        parent_id=child.id,
        metadata={SWEEP_META: sweep.id, TRIAL_META: str(number)},
    )
    add_event(
        session,
        sweep.id,
        "trial",
        f"Trial {number} trained; evaluation {evaluation.id} scores its {objective.metric}.",
        data={"number": number, "fine_tuning_job": child.id, "evaluation_job": evaluation.id},
    )
    return evaluation

"""Sweeps: a state machine in the database, advanced by the reconciler, never by a worker.

A worker runs one job at a time; a sweep that waited for its trials on a worker would deadlock a
one-worker deployment. So a sweep holds no worker: each reconciler pass (worker/reconcile.py, in every API
process and in `grove reconcile --loop`) calls `advance_sweeps`, which, for each unfinished sweep, in one
transaction holding the sweep's row lock:

1. claims it (queued -> running) on its first pass;
2. reads its trials (child fine-tuning jobs, `parent_id` = the sweep, `metadata.sweep_trial` = the optuna
   trial number) and reports what they did to optuna: new intermediate validation losses from their
   `metrics` events, the objective of finished ones (`valid_loss` of the published adapter, or a metric of
   an evaluation job it starts for the trial), failures;
3. prunes (median rule, optuna MedianPruner) by cancelling a trial's job;
4. asks optuna for new trials while fewer than `max_parallel` are unfinished, and creates each as a
   fine-tuning job exactly as POST /v1/fine_tuning/jobs would (so it is dispatched to the workers);
5. once every trial has finished, publishes the report (JSON + CSV table, PNG plot of the objective
   against each parameter) and a pointer to the best adapter, and marks the sweep succeeded.

The optuna study (sampler state, trials, values) lives in optuna's RDB storage on the service's own
database server, isolated from our alembic-managed tables: a PostgreSQL schema `optuna` (optuna creates
its tables and stamps its own alembic version there), or, on SQLite, a file beside the database. Everything
a pass decides is derived again from the database on the next one, so a crash between optuna's commit and
ours loses nothing: an optuna trial without a job is given its job (or failed), a job that finished is
told to optuna if optuna still has it running, a pruned trial whose job still runs is cancelled.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import tempfile
import threading
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from jobs import fine_tune, lifecycle
from jobs.evaluation import enqueue_evaluation
from jobs.evaluation_spec import EvaluationSettings, EvaluationSpec, Target
from jobs.fine_tune_spec import CreateFineTuningJob
from jobs.sweep_spec import (
    RESULTS_PURPOSE,
    SWEEP_META,
    TRIAL_META,
    SweepSpec,
    apply_params,
    grid_values,
    loc_param,
)
from models.base import unix, utcnow
from models.config import get_settings
from models.db import get_engine, session_scope
from models.errors import GroveError, InvalidRequest
from models.job import Job, JobEvent
from models.job_kind import JobKind
from models.job_status import TERMINAL, JobStatus
from models.project import Project
from models.results import publish_file
from models.transitions import add_event, switch_job_status

log = logging.getLogger(__name__)

FINE_TUNE_KIND = "fine_tune"
OPTUNA_SCHEMA = "optuna"
UNFINISHED = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)


# --- optuna's storage -----------------------------------------------------------------------------------


def optuna_storage_url(database_url: str) -> tuple[str, dict]:
    """Where optuna keeps its studies, and the engine options that keep it apart from our tables."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database
        if not database or database == ":memory:":
            return "sqlite:///:memory:", {}
        path = Path(database)
        beside = path.with_name(f"{path.stem}-optuna{path.suffix or '.db'}")
        return url.set(database=str(beside)).render_as_string(hide_password=False), {"connect_args": {"timeout": 30}}
    kwargs: dict = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"options": f"-csearch_path={OPTUNA_SCHEMA}"}
    return url.render_as_string(hide_password=False), kwargs


_storages: dict[str, Any] = {}
_storage_lock = threading.Lock()


def study_storage():
    """optuna's RDBStorage for this service's database (one per process)."""
    database_url = get_settings().database_url
    with _storage_lock:
        if database_url in _storages:
            return _storages[database_url]
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url, kwargs = optuna_storage_url(database_url)
        if make_url(database_url).get_backend_name() == "postgresql":
            with get_engine().connect() as connection:
                # Two processes may race here; the loser's error is harmless (the schema exists).
                try:
                    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{OPTUNA_SCHEMA}"'))
                    connection.commit()
                except Exception:
                    connection.rollback()
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        _storages[database_url] = storage
        return storage


def _grid_sampler(space: dict[str, list], seed: int):
    import optuna

    class OrderedGridSampler(optuna.samplers.GridSampler):
        """optuna's GridSampler, taking the grid in the order given (first parameter slowest) instead of a
        shuffled order, and never stopping a study: a sweep counts its own trials (GridSampler's after_trial
        calls study.stop(), which only an optimize() loop accepts)."""

        def __init__(self, search_space: dict[str, list], seed: int | None = None):
            super().__init__(search_space, seed)
            names = list(search_space)
            self._all_grids = [
                tuple(combo[names.index(name)] for name in self._param_names)
                for combo in itertools.product(*search_space.values())
            ]

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return OrderedGridSampler(space, seed)


def _sampler(spec: SweepSpec, n_trials: int):
    """A fresh sampler for this pass. Samplers hold a random state; seeding it with the number of trials so far
    gives every pass (in any process) the same draws a single long-lived sampler would not repeat."""
    import optuna

    if spec.strategy == "grid":
        return _grid_sampler({name: grid_values(name, p) for name, p in spec.search_space.items()}, spec.seed)
    seed = spec.seed + n_trials
    if spec.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def _pruner(spec: SweepSpec):
    import optuna

    if spec.pruning is None:
        return optuna.pruners.NopPruner()
    p = spec.pruning
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials,
        n_warmup_steps=p.n_warmup_steps,
        interval_steps=p.interval_steps,
        n_min_trials=p.n_min_trials,
    )


def distributions(spec: SweepSpec) -> dict:
    import optuna.distributions as d

    out = {}
    for name, p in spec.search_space.items():
        if p.type == "categorical":
            out[name] = d.CategoricalDistribution(p.values)
        elif p.type == "int":
            out[name] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def load_study(spec: SweepSpec, sweep_id: str):
    """The sweep's optuna study (named after the sweep), created on its first pass."""
    import optuna

    storage = study_storage()
    try:
        study = optuna.load_study(study_name=sweep_id, storage=storage, pruner=_pruner(spec))
    except KeyError:
        study = optuna.create_study(
            storage=storage, study_name=sweep_id, direction=spec.direction, pruner=_pruner(spec), load_if_exists=True
        )
    study.sampler = _sampler(spec, len(study.get_trials(deepcopy=False)))
    return study


# --- the reconciler's entry point -----------------------------------------------------------------------


def advance_sweeps() -> int:
    """Advance every unfinished sweep once; return how many were advanced."""
    with session_scope() as session:
        ids = list(
            session.scalars(
                select(Job.id).where(Job.kind == JobKind.sweep, Job.status.in_(sorted(UNFINISHED))).order_by(Job.id)
            )
        )
    advanced = 0
    for sweep_id in ids:
        try:
            advanced += advance(sweep_id)
        except Exception:
            log.exception("advancing sweep %s failed; the next pass retries", sweep_id)
    return advanced


def _lock(session: Session, sweep_id: str) -> Job | None:
    """The sweep's row, locked until commit: one reconciler at a time advances a sweep.

    PostgreSQL skips a sweep another process is advancing; SQLite serializes writers, so taking the
    write lock first (a no-op UPDATE) makes a second pass wait and then see the first one's work.
    """
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(Job).where(Job.id == sweep_id).with_for_update(skip_locked=True))
    session.execute(update(Job).where(Job.id == sweep_id).values(step=Job.step))
    return session.get(Job, sweep_id)


def advance(sweep_id: str) -> bool:
    with session_scope() as session:
        sweep = _lock(session, sweep_id)
        if sweep is None or sweep.kind != JobKind.sweep or JobStatus(sweep.status).is_terminal:
            return False
        SweepPass(session, sweep).run()
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


class SweepPass:
    """One pass over one sweep, inside the transaction that holds its row lock."""

    def __init__(self, session: Session, sweep: Job):
        self.session = session
        self.sweep = sweep
        self.spec = SweepSpec.model_validate(sweep.spec)
        self.metric = self.spec.objective.metric
        self.sign = 1.0 if self.spec.direction == "minimize" else -1.0
        self.trials: dict[int, Job] = {}  # optuna trial number -> fine-tuning job
        self.evaluations: dict[str, Job] = {}  # trial job id -> its evaluation job
        self.study = None
        self.frozen: dict[int, Any] = {}

    # -- reading -------------------------------------------------------------------------------------------

    def _load_children(self) -> None:
        children = self.session.scalars(
            select(Job).where(Job.parent_id == self.sweep.id, Job.kind == FINE_TUNE_KIND).order_by(Job.id)
        ).all()
        self.trials = {}
        for child in children:
            number = (child.user_metadata or {}).get(TRIAL_META)
            if number is not None and str(number).isdigit():
                self.trials[int(number)] = child
        self.evaluations = {}
        if children:
            for job in self.session.scalars(
                select(Job)
                .where(Job.parent_id.in_([c.id for c in children]), Job.kind == JobKind.evaluation)
                .order_by(Job.id)
            ):
                if (job.user_metadata or {}).get(SWEEP_META) == self.sweep.id:
                    self.evaluations[job.parent_id] = job

    def _refresh_frozen(self) -> None:
        self.frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}

    def _valid_losses(self, job_ids: list[str]) -> dict[str, dict[int, float]]:
        """Validation losses from the trials' metrics events: job id -> {step: loss}."""
        out: dict[str, dict[int, float]] = {job_id: {} for job_id in job_ids}
        if not job_ids:
            return out
        rows = self.session.execute(
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

    # -- the pass ------------------------------------------------------------------------------------------

    def run(self) -> None:
        from optuna.trial import TrialState

        self.TrialState = TrialState
        if self.sweep.status == JobStatus.queued:
            self._claim()
        self._load_children()
        self.study = load_study(self.spec, self.sweep.id)
        self._refresh_frozen()
        self._follow_trials()
        status = JobStatus(self.sweep.status)
        if status == JobStatus.running:
            self._adopt_orphans()
            self._ask_for_trials()
        elif status == JobStatus.cancelling:
            lifecycle.cancel_children(self.session, self.sweep.id, f"Sweep {self.sweep.id} was cancelled.")
        self._refresh_frozen()
        summary = self._summary()
        if JobStatus(self.sweep.status) == JobStatus.running and self._all_done():
            self._finish(summary)
        elif JobStatus(self.sweep.status) == JobStatus.cancelling and self._all_done(children_only=True):
            self._store(summary)
            switch_job_status(
                self.session,
                self.sweep.id,
                JobStatus.cancelled,
                only_from={JobStatus.cancelling},
                message=f"Sweep cancelled after {summary['counts']['finished']} finished trials.",
                data={"counts": summary["counts"]},
            )
        else:
            self._store(summary)

    def _claim(self) -> None:
        spec = self.spec
        message = (
            f"Sweep started: {spec.strategy} search over {', '.join(spec.search_space)}; {spec.num_trials} trials, "
            f"{spec.max_parallel} at a time, {spec.direction} {self.metric}."
        )
        if switch_job_status(
            self.session,
            self.sweep.id,
            JobStatus.running,
            only_from={JobStatus.queued},
            lease_owner="sweep-reconciler",
            lease_seconds=1,
            message=message,
        ):
            # A sweep holds no worker and so no lease: the reconciler never requeues it.
            self.session.execute(
                update(Job)
                .where(Job.id == self.sweep.id)
                .values(lease_owner=None, lease_expires_at=None, total_steps=spec.num_trials, step=0)
                .execution_options(synchronize_session=False)
            )
        self.session.refresh(self.sweep)

    def _follow_trials(self) -> None:
        """Report every trial's progress to optuna: intermediate losses, outcomes, prunes."""
        TrialState = self.TrialState
        following = [
            child
            for number, child in self.trials.items()
            if number in self.frozen and self.frozen[number].state == TrialState.RUNNING
        ]
        losses = self._valid_losses([c.id for c in following])
        pruning = self.spec.pruning is not None and self.sweep.status == JobStatus.running
        for number, child in sorted(self.trials.items()):
            frozen = self.frozen.get(number)
            if frozen is None:
                continue
            if frozen.state == TrialState.PRUNED and child.status not in TERMINAL:
                lifecycle.request_cancel(self.session, child.id, f"Pruned by sweep {self.sweep.id}.")
                continue
            if frozen.state != TrialState.RUNNING:
                continue
            trial, last = self._report(frozen, losses.get(child.id, {}))
            status = JobStatus(child.status)
            if status == JobStatus.succeeded:
                self._conclude(number, child)
            elif status in (JobStatus.failed, JobStatus.cancelled):
                self._tell_failed(number, child)
            elif pruning and status == JobStatus.running and trial is not None and trial.should_prune():
                self._prune(number, child, *last)

    def _report(self, frozen, losses: dict[int, float]):
        """Send the validation losses optuna has not seen yet (negated when maximizing, so that the median
        rule keeps its sense); return the optuna Trial and the last (step, loss) if there were any."""
        from optuna.trial import Trial

        new = {step: loss for step, loss in sorted(losses.items()) if step not in frozen.intermediate_values}
        if not new:
            return None, (None, None)
        trial = Trial(self.study, frozen._trial_id)
        for step, loss in new.items():
            trial.report(self.sign * loss, step)
        return trial, list(new.items())[-1]

    def _objective(self, number: int, child: Job) -> tuple[str, float | None, str | None]:
        """("ok", value, None), ("pending", None, None) or ("failed", None, why)."""
        if not self.spec.objective.uses_evaluation:
            result = child.result or {}
            best = result.get("best_valid_loss")
            use_best = (child.spec or {}).get("result_adapter", "best") == "best" and best is not None
            value = best if use_best else result.get("valid_loss")
            if not isinstance(value, int | float):
                return "failed", None, "the trial reported no validation loss"
            return "ok", float(value), None
        evaluation = self.evaluations.get(child.id)
        if evaluation is None:
            if not child.result_files:
                return "failed", None, "the trial published no adapter to evaluate"
            self._start_evaluation(number, child)
            return "pending", None, None
        if evaluation.status not in TERMINAL:
            return "pending", None, None
        if evaluation.status != JobStatus.succeeded:
            why = (evaluation.error or {}).get("message") or f"its evaluation job was {evaluation.status}"
            return "failed", None, f"evaluation {evaluation.id}: {why}"
        targets = (evaluation.result or {}).get("targets") or [{}]
        value = (targets[0].get("metrics") or {}).get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return "failed", None, f"evaluation {evaluation.id} reported no {self.metric}"
        return "ok", float(value), None

    def _start_evaluation(self, number: int, child: Job) -> None:
        objective = self.spec.objective
        settings = EvaluationSettings.model_validate(
            objective.evaluation.model_dump() if objective.evaluation else {"metrics": [self.metric]}
        )
        spec = EvaluationSpec(
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
            self.session,
            self.sweep.project_id,
            spec,
            self.sweep.queue,
            parent_id=child.id,
            metadata={SWEEP_META: self.sweep.id, TRIAL_META: str(number)},
        )
        self.evaluations[child.id] = evaluation
        add_event(
            self.session,
            self.sweep.id,
            "trial",
            f"Trial {number} trained; evaluation {evaluation.id} scores its {self.metric}.",
            data={"number": number, "fine_tuning_job": child.id, "evaluation_job": evaluation.id},
        )

    def _conclude(self, number: int, child: Job) -> None:
        outcome, value, why = self._objective(number, child)
        if outcome == "pending":
            return
        if outcome == "failed":
            self._tell_failed(number, child, why)
            return
        self.study.tell(number, value, skip_if_finished=True)
        self._refresh_frozen()
        best = self._best()
        best_text = f"best so far: trial {best.number}" if best is not None else ""
        add_event(
            self.session,
            self.sweep.id,
            "trial",
            f"Trial {number} complete: {self.metric}={value:.6g} ({_params_text(self.frozen[number].params)}); "
            f"{best_text}.",
            data={
                "number": number,
                "fine_tuning_job": child.id,
                "state": "complete",
                "objective": value,
                "params": self.frozen[number].params,
                "best_trial": best.number if best is not None else None,
                "best_objective": best.value if best is not None else None,
            },
        )

    def _tell_failed(self, number: int, child: Job, why: str | None = None) -> None:
        self.study.tell(number, state=self.TrialState.FAIL, skip_if_finished=True)
        why = why or (child.error or {}).get("message") or f"its job was {child.status}"
        state = "cancelled" if child.status == JobStatus.cancelled else "failed"
        add_event(
            self.session,
            self.sweep.id,
            "trial",
            f"Trial {number} {state}: {why}",
            data={"number": number, "fine_tuning_job": child.id, "state": state, "reason": why},
            level="warning" if state == "failed" else "info",
        )

    def _prune(self, number: int, child: Job, step: int, loss: float) -> None:
        self.study.tell(number, state=self.TrialState.PRUNED, skip_if_finished=True)
        lifecycle.request_cancel(self.session, child.id, f"Pruned by sweep {self.sweep.id} at step {step}.")
        add_event(
            self.session,
            self.sweep.id,
            "trial",
            f"Trial {number} pruned at step {step}: validation loss {loss:.6g} is worse than the median of the "
            f"completed trials at that step.",
            data={"number": number, "fine_tuning_job": child.id, "state": "pruned", "step": step, "valid_loss": loss},
        )

    def _capacity(self) -> int:
        return lifecycle.room_left(self.session, self.sweep.project_id)

    def _unfinished(self) -> int:
        return sum(1 for t in self.frozen.values() if t.state == self.TrialState.RUNNING)

    def _adopt_orphans(self) -> None:
        """An optuna trial asked for in a pass that then failed to commit has no job: give it one, or fail it."""
        for number, frozen in sorted(self.frozen.items()):
            if frozen.state != self.TrialState.RUNNING or number in self.trials:
                continue
            complete = set(frozen.params) == set(self.spec.search_space)
            if complete and len(self.trials) < self.spec.num_trials and self._capacity() > 0:
                self._create_trial(number, dict(frozen.params))
            elif not complete or len(self.trials) >= self.spec.num_trials:
                self.study.tell(number, state=self.TrialState.FAIL, skip_if_finished=True)
            if JobStatus(self.sweep.status) != JobStatus.running:
                return

    def _ask_for_trials(self) -> None:
        spaces = distributions(self.spec)
        unfinished = self._unfinished()
        while len(self.trials) < self.spec.num_trials and unfinished < self.spec.max_parallel:
            if self._capacity() <= 0:
                break  # the project holds as many unfinished jobs as it may; wait for some to finish
            trial = self.study.ask(spaces)
            self._create_trial(trial.number, dict(trial.params))
            if JobStatus(self.sweep.status) != JobStatus.running:
                return
            unfinished += 1
            # The next draw (TPE, random) must know of this one.
            self.study.sampler = _sampler(self.spec, trial.number + 1)

    def _create_trial(self, number: int, params: dict) -> None:
        body = apply_params(self.spec.fine_tuning, self.spec.parameters, params)
        body["metadata"] = (body.get("metadata") or {}) | {SWEEP_META: self.sweep.id, TRIAL_META: str(number)}
        try:
            request = CreateFineTuningJob.model_validate(body)
            project = self.session.get(Project, self.sweep.project_id)
            child = fine_tune.create(self.session, project, request)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = loc_param(tuple(first.get("loc", ())))
            self._trial_refused(number, params, InvalidRequest(f"{param}: {first.get('msg')}", param=param))
            return
        except GroveError as exc:
            if exc.status_code == 429:
                return  # the project is full for a moment; the trial waits for the next pass (an orphan)
            if exc.status_code >= 500:
                raise
            self._trial_refused(number, params, exc)
            return
        child.parent_id = self.sweep.id
        if child.queue != self.sweep.queue:
            # Trials go where the sweep was sent when it was created, like every (re)publish of a job.
            child.queue = self.sweep.queue
            pending = self.session.info.get("dispatch_after_commit", [])
            pending[:] = [(j, k, self.sweep.queue if j == child.id else q) for j, k, q in pending]
        self.session.flush()
        self.trials[number] = child
        add_event(
            self.session,
            self.sweep.id,
            "trial",
            f"Trial {number} created: {child.id} ({_params_text(params)}).",
            data={"number": number, "fine_tuning_job": child.id, "state": "running", "params": params},
        )

    def _trial_refused(self, number: int, params: dict, exc: GroveError) -> None:
        """A trial's request was refused (a file deleted since the sweep was created, ...): the sweep fails."""
        self.study.tell(number, state=self.TrialState.FAIL, skip_if_finished=True)
        param = exc.param
        named = next((n for n, path in self.spec.parameters.items() if param and param.startswith(path)), None)
        error = {
            "code": exc.code or "invalid_request",
            "message": f"Trial {number} ({_params_text(params)}) could not be created: {exc.message}",
            "param": f"search_space.{named}" if named else (f"fine_tuning.{param}" if param else "fine_tuning"),
            "type": "user_error",
        }
        lifecycle.cancel_children(self.session, self.sweep.id, f"Sweep {self.sweep.id} failed.")
        switch_job_status(self.session, self.sweep.id, JobStatus.failed, only_from={JobStatus.running}, error=error)
        self.session.refresh(self.sweep)

    # -- the summary and the end ---------------------------------------------------------------------------

    def _all_done(self, children_only: bool = False) -> bool:
        jobs = list(self.trials.values()) + list(self.evaluations.values())
        if any(job.status not in TERMINAL for job in jobs):
            return False
        if children_only:
            return True
        return len(self.trials) >= self.spec.num_trials and self._unfinished() == 0

    def _best(self):
        complete = [t for t in self.frozen.values() if t.state == self.TrialState.COMPLETE and t.value is not None]
        if not complete:
            return None
        key = (lambda t: (t.value, t.number)) if self.sign > 0 else (lambda t: (-t.value, t.number))
        return min(complete, key=key)

    def _trial_row(self, number: int, child: Job) -> dict:
        TrialState = self.TrialState
        frozen = self.frozen.get(number)
        state = "running"
        if frozen is not None:
            if frozen.state == TrialState.RUNNING:
                state = "evaluating" if child.status == JobStatus.succeeded else "running"
            elif frozen.state == TrialState.COMPLETE:
                state = "complete"
            elif frozen.state == TrialState.PRUNED:
                state = "pruned"
            elif frozen.state == TrialState.FAIL:
                state = "cancelled" if child.status == JobStatus.cancelled else "failed"
            else:
                state = frozen.state.name.lower()
        intermediate = None
        if frozen is not None and frozen.intermediate_values:
            step = max(frozen.intermediate_values)
            intermediate = {"step": step, "valid_loss": self.sign * frozen.intermediate_values[step]}
        evaluation = self.evaluations.get(child.id)
        params = dict(frozen.params) if frozen is not None else {}
        return {
            "number": number,
            "fine_tuning_job": child.id,
            "status": str(child.status),
            "state": state,
            "params": {name: params.get(name) for name in self.spec.search_space},
            "objective": frozen.value if frozen is not None and state == "complete" else None,
            "intermediate": intermediate,
            "evaluation_job": evaluation.id if evaluation is not None else None,
            "adapter_file": (child.result_files or [None])[0] if child.status == JobStatus.succeeded else None,
            "fine_tuned_model": child.fine_tuned_model,
            "error": child.error,
        }

    def _summary(self) -> dict:
        rows = [self._trial_row(number, child) for number, child in sorted(self.trials.items())]
        best = self._best()
        best_row = next((r for r in rows if best is not None and r["number"] == best.number), None)
        states = [r["state"] for r in rows]
        counts = {
            "created": len(rows),
            "finished": sum(1 for s in states if s not in ("running", "evaluating")),
            **{s: states.count(s) for s in ("running", "evaluating", "complete", "pruned", "failed", "cancelled")},
        }
        return {
            "objective": {"metric": self.metric, "direction": self.spec.direction},
            "best_trial": best_row,
            "counts": counts,
            "trials": rows,
        }

    def _store(self, summary: dict) -> None:
        finished = summary["counts"]["finished"]
        values: dict = {}
        if self.sweep.result != summary:
            values["result"] = summary
        if self.sweep.step != finished:
            values["step"] = finished
        if values:
            self.session.execute(
                update(Job).where(Job.id == self.sweep.id).values(**values).execution_options(synchronize_session=False)
            )
            self.session.expire(self.sweep)

    def _finish(self, summary: dict) -> None:
        best = summary["best_trial"]
        counts = summary["counts"]
        if best is None:
            failed = next((r for r in summary["trials"] if r["error"]), None)
            first = f" First failure: trial {failed['number']}: {failed['error'].get('message')}" if failed else ""
            error = {
                "code": "no_trial_completed",
                "message": f"None of the {counts['created']} trials completed ({counts['failed']} failed, "
                f"{counts['pruned']} pruned, {counts['cancelled']} cancelled).{first}",
                "param": None,
                "type": (failed["error"].get("type") if failed else None) or "user_error",
            }
            self._store(summary)
            switch_job_status(self.session, self.sweep.id, JobStatus.failed, only_from={JobStatus.running}, error=error)
            return
        with tempfile.TemporaryDirectory(prefix=f"{self.sweep.id}-") as tmp:
            folder = Path(tmp)
            report = self._report_document(summary)
            (folder / "report.json").write_text(json.dumps(report, indent=2))
            write_trials_csv(summary["trials"], list(self.spec.search_space), folder / "trials.csv")
            plot_objective(summary["trials"], self.spec, folder / "objective.png", self.sweep.id)
            files = [
                publish_file(
                    self.session, self.sweep.project_id, folder / name, f"{self.sweep.id}-{name}",
                    RESULTS_PURPOSE, self.sweep.id,
                )
                for name in ("report.json", "objective.png", "trials.csv")
            ]  # fmt: skip
        result = summary | {"files": {"report": files[0].id, "plot": files[1].id, "trials_csv": files[2].id}}
        self.session.execute(
            update(Job)
            .where(Job.id == self.sweep.id)
            .values(
                result=result,
                result_files=[f.id for f in files],
                fine_tuned_model=best["fine_tuned_model"],
                step=counts["finished"],
                estimated_finish=None,
            )
            .execution_options(synchronize_session=False)
        )
        switch_job_status(
            self.session,
            self.sweep.id,
            JobStatus.succeeded,
            only_from={JobStatus.running},
            message=f"Sweep finished: best trial {best['number']} ({best['fine_tuning_job']}) "
            f"{self.metric}={best['objective']:.6g} with {_params_text(best['params'])}; "
            f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed.",
            data={"best_trial": best, "counts": counts, "result_files": [f.id for f in files]},
        )

    def _report_document(self, summary: dict) -> dict:
        spec = self.spec
        return {
            "object": "sweep.report",
            "sweep_id": self.sweep.id,
            "created_at": unix(utcnow()),
            "model": self.sweep.model,
            "strategy": spec.strategy,
            "num_trials": spec.num_trials,
            "max_parallel": spec.max_parallel,
            "objective": {"metric": self.metric, "direction": spec.direction}
            | ({"evaluation_file": spec.objective.evaluation_file} if spec.objective.uses_evaluation else {}),
            "pruning": spec.pruning.model_dump() if spec.pruning else None,
            "search_space": {k: v.model_dump(exclude_none=True) for k, v in spec.search_space.items()},
            "fine_tuning": spec.fine_tuning,
            "counts": summary["counts"],
            "best_trial": summary["best_trial"],
            "trials": summary["trials"],
        }


# --- report files ---------------------------------------------------------------------------------------


def write_trials_csv(rows: list[dict], names: list[str], path: Path) -> Path:
    columns = ["number", "fine_tuning_job", "state", "status", "objective", *names, "last_step", "last_valid_loss"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            last = r.get("intermediate") or {}
            writer.writerow(
                [r["number"], r["fine_tuning_job"], r["state"], r["status"], r["objective"]]
                + [r["params"].get(n) for n in names]
                + [last.get("step"), last.get("valid_loss")]
            )
    return path


def plot_objective(rows: list[dict], spec: SweepSpec, path: Path, title: str) -> Path:
    """The objective against each searched parameter (one panel each); pruned trials at their last loss."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = list(spec.search_space)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    figure = Figure(figsize=(4.2 * ncols, 3.6 * nrows), dpi=100)
    metric = spec.objective.metric
    complete = [r for r in rows if r["state"] == "complete"]
    best = min(complete, key=lambda r: r["objective"] * (1 if spec.direction == "minimize" else -1), default=None)
    pruned = [r for r in rows if r["state"] == "pruned" and r.get("intermediate")] if metric == "valid_loss" else []
    for i, name in enumerate(names, start=1):
        axes = figure.add_subplot(nrows, ncols, i)
        p = spec.search_space[name]
        categories: list = list(p.values or []) if p.type == "categorical" else []

        def x_of(row: dict, _name: str = name, _categories: list = categories):
            value = row["params"].get(_name)
            return _categories.index(value) if _categories else value

        if complete:
            axes.plot([x_of(r) for r in complete], [r["objective"] for r in complete], "o", label="complete")
        if pruned:
            axes.plot(
                [x_of(r) for r in pruned],
                [r["intermediate"]["valid_loss"] for r in pruned],
                "x",
                color="tab:red",
                label="pruned (last loss)",
            )
        if best is not None:
            axes.plot([x_of(best)], [best["objective"]], "*", markersize=14, color="tab:orange", label="best")
        if categories:
            axes.set_xticks(range(len(categories)), [str(c) for c in categories])
        elif p.log:
            axes.set_xscale("log")
        axes.set_xlabel(name)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        if i == 1 and axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.suptitle(f"{title}: {metric} ({spec.direction}) per trial")
    figure.tight_layout()
    figure.savefig(path)
    return path


__all__ = [
    "advance",
    "advance_sweeps",
    "load_study",
    "optuna_storage_url",
    "plot_objective",
    "study_storage",
]

"""Sweeps: a state machine in the database, advanced by the reconciler, never by a worker.

A worker runs one job at a time; a sweep that waited for its trials on a worker would deadlock a
one-worker deployment. So a sweep holds no worker: each reconciler pass (worker/reconcile.py, in every API
process and in `grove reconcile --loop`) calls `advance_sweeps`, which, for each unfinished sweep, in one
transaction holding the sweep's row lock runs a `SweepPass`:

1. claims it (queued -> running) on its first pass;
2. reads its trials (child fine-tuning jobs, `parent_id` = the sweep, `metadata.sweep_trial` = the optuna
   trial number; worker/sweep_trials.py) and reports what they did to optuna: new intermediate validation
   losses from their `metrics` events, the objective of finished ones (`valid_loss` of the published adapter,
   or a metric of an evaluation job it starts for the trial), failures;
3. prunes (median rule, optuna MedianPruner) by cancelling a trial's job;
4. asks optuna for new trials while fewer than `max_parallel` are unfinished, and creates each as a
   fine-tuning job exactly as POST /v1/fine_tuning/jobs would (jobs/fine_tune.py, so it is dispatched to the
   workers);
5. writes the summary of its trials on the sweep and, once every trial has finished, publishes the report
   and a pointer to the best adapter, and marks the sweep succeeded (worker/sweep_report.py).

The optuna study lives in optuna's own storage on the service's database server (worker/sweep_study.py).
Everything a pass decides is derived again from the database on the next one, so a crash between optuna's
commit and ours loses nothing: an optuna trial without a job is given its job (or failed), a job that
finished is told to optuna if optuna still has it running, a pruned trial whose job still runs is cancelled.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import fine_tune, lifecycle
from jobs.fine_tune_spec import CreateFineTuningJob
from jobs.sweep_spec import SWEEP_META, TRIAL_META, SweepSpec, apply_params, loc_param
from models.db import session_scope
from models.errors import GroveError, InvalidRequest
from models.job import Job
from models.job_kind import JobKind
from models.job_status import TERMINAL, JobStatus
from models.project import Project
from models.transitions import add_event, switch_job_status
from worker.sweep_report import SweepReport, params_text
from worker.sweep_study import best_trial, distributions, load_study, running_trial, sampler
from worker.sweep_trials import needs_evaluation, start_evaluation, trial_jobs, trial_objective, valid_losses

log = logging.getLogger(__name__)

UNFINISHED = (JobStatus.queued, JobStatus.running, JobStatus.cancelling)


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


class SweepPass:
    """One pass over one sweep, inside the transaction that holds its row lock."""

    def __init__(self, session: Session, sweep: Job):
        # Imported here, not at the top: optuna is slow to import, and a reconciler pass with no sweep to
        # advance never needs it.
        from optuna.trial import TrialState

        self.states = TrialState
        self.session = session
        self.sweep = sweep
        self.spec = SweepSpec.model_validate(sweep.spec)
        self.metric = self.spec.objective.metric
        self.sign = 1.0 if self.spec.direction == "minimize" else -1.0
        self.trials: dict[int, Job] = {}  # optuna trial number -> fine-tuning job
        self.evaluations: dict[str, Job] = {}  # trial job id -> its evaluation job
        self.study = None
        self.frozen: dict[int, Any] = {}  # optuna trial number -> FrozenTrial, as last read

    def run(self) -> None:
        if self.sweep.status == JobStatus.queued:
            self._claim()
        self.trials, self.evaluations = trial_jobs(self.session, self.sweep.id)
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
        report = SweepReport(self.session, self.sweep, self.spec, self.trials, self.evaluations, self.frozen)
        summary = report.summary()
        if JobStatus(self.sweep.status) == JobStatus.running and self._all_done():
            report.finish(summary)
        elif JobStatus(self.sweep.status) == JobStatus.cancelling and self._all_done(children_only=True):
            report.cancelled(summary)
        else:
            report.store(summary)

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

    def _refresh_frozen(self) -> None:
        self.frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}

    def _trial_event(self, message: str, data: dict, level: str = "info") -> None:
        add_event(self.session, self.sweep.id, "trial", message, data=data, level=level)

    # -- following the trials --------------------------------------------------------------------------------

    def _follow_trials(self) -> None:
        """Report every trial's progress to optuna: intermediate losses, outcomes, prunes."""
        states = self.states
        following = [
            child
            for number, child in self.trials.items()
            if number in self.frozen and self.frozen[number].state == states.RUNNING
        ]
        losses = valid_losses(self.session, [c.id for c in following])
        pruning = self.spec.pruning is not None and self.sweep.status == JobStatus.running
        for number, child in sorted(self.trials.items()):
            frozen = self.frozen.get(number)
            if frozen is None:
                continue
            if frozen.state == states.PRUNED and child.status not in TERMINAL:
                lifecycle.request_cancel(self.session, child.id, f"Pruned by sweep {self.sweep.id}.")
                continue
            if frozen.state != states.RUNNING:
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
        new = {step: loss for step, loss in sorted(losses.items()) if step not in frozen.intermediate_values}
        if not new:
            return None, (None, None)
        trial = running_trial(self.study, frozen.number)
        for step, loss in new.items():
            trial.report(self.sign * loss, step)
        return trial, list(new.items())[-1]

    def _conclude(self, number: int, child: Job) -> None:
        evaluation = self.evaluations.get(child.id)
        if needs_evaluation(self.spec, child, evaluation):
            self.evaluations[child.id] = start_evaluation(self.session, self.sweep, self.spec, number, child)
            return
        outcome, value, why = trial_objective(self.spec, child, evaluation)
        if outcome == "pending":
            return
        if outcome == "failed":
            self._tell_failed(number, child, why)
            return
        self.study.tell(number, value, skip_if_finished=True)
        self._refresh_frozen()
        best = best_trial(self.frozen.values(), self.sign)
        best_text = f"best so far: trial {best.number}" if best is not None else ""
        self._trial_event(
            f"Trial {number} complete: {self.metric}={value:.6g} ({params_text(self.frozen[number].params)}); "
            f"{best_text}.",
            {
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
        self.study.tell(number, state=self.states.FAIL, skip_if_finished=True)
        why = why or (child.error or {}).get("message") or f"its job was {child.status}"
        state = "cancelled" if child.status == JobStatus.cancelled else "failed"
        self._trial_event(
            f"Trial {number} {state}: {why}",
            {"number": number, "fine_tuning_job": child.id, "state": state, "reason": why},
            level="warn" if state == "failed" else "info",
        )

    def _prune(self, number: int, child: Job, step: int, loss: float) -> None:
        self.study.tell(number, state=self.states.PRUNED, skip_if_finished=True)
        lifecycle.request_cancel(self.session, child.id, f"Pruned by sweep {self.sweep.id} at step {step}.")
        self._trial_event(
            f"Trial {number} pruned at step {step}: validation loss {loss:.6g} is worse than the median of the "
            f"completed trials at that step.",
            {"number": number, "fine_tuning_job": child.id, "state": "pruned", "step": step, "valid_loss": loss},
        )

    # -- asking for trials -----------------------------------------------------------------------------------

    def _capacity(self) -> int:
        return lifecycle.room_left(self.session, self.sweep.project_id)

    def _unfinished(self) -> int:
        return sum(1 for t in self.frozen.values() if t.state == self.states.RUNNING)

    def _adopt_orphans(self) -> None:
        """An optuna trial asked for in a pass that then failed to commit has no job: give it one, or fail it."""
        for number, frozen in sorted(self.frozen.items()):
            if frozen.state != self.states.RUNNING or number in self.trials:
                continue
            complete = set(frozen.params) == set(self.spec.search_space)
            if complete and len(self.trials) < self.spec.num_trials and self._capacity() > 0:
                self._create_trial(number, dict(frozen.params))
            elif not complete or len(self.trials) >= self.spec.num_trials:
                self.study.tell(number, state=self.states.FAIL, skip_if_finished=True)
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
            self.study.sampler = sampler(self.spec, trial.number + 1)

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
        self._trial_event(
            f"Trial {number} created: {child.id} ({params_text(params)}).",
            {"number": number, "fine_tuning_job": child.id, "state": "running", "params": params},
        )

    def _trial_refused(self, number: int, params: dict, exc: GroveError) -> None:
        """A trial's request was refused (a file deleted since the sweep was created, ...): the sweep fails."""
        self.study.tell(number, state=self.states.FAIL, skip_if_finished=True)
        param = exc.param
        named = next((n for n, path in self.spec.parameters.items() if param and param.startswith(path)), None)
        error = {
            "code": exc.code or "invalid_request",
            "message": f"Trial {number} ({params_text(params)}) could not be created: {exc.message}",
            "param": f"search_space.{named}" if named else (f"fine_tuning.{param}" if param else "fine_tuning"),
            "type": "user_error",
        }
        lifecycle.cancel_children(self.session, self.sweep.id, f"Sweep {self.sweep.id} failed.")
        switch_job_status(self.session, self.sweep.id, JobStatus.failed, only_from={JobStatus.running}, error=error)
        self.session.refresh(self.sweep)

    def _all_done(self, children_only: bool = False) -> bool:
        jobs = list(self.trials.values()) + list(self.evaluations.values())
        if any(job.status not in TERMINAL for job in jobs):
            return False
        if children_only:
            return True
        return len(self.trials) >= self.spec.num_trials and self._unfinished() == 0


__all__ = ["SweepPass", "advance", "advance_sweeps", "distributions", "load_study"]

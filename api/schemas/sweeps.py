"""Sweep jobs: the request (a base fine-tuning request + a search space) and the sweep, trial and event objects."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.schemas.common import JobEventObject, job_times
from models.job import Job


class Trial(BaseModel):
    number: int = Field(description="The optuna trial number (0, 1, ...).")
    fine_tuning_job: str = Field(description="The trial's fine-tuning job (GET /v1/fine_tuning/jobs/{id}).")
    status: str = Field(description="The fine-tuning job's status.")
    state: str = Field(
        description="running, evaluating (fine-tune done, evaluation job running), complete, pruned, failed or "
        "cancelled."
    )
    params: dict[str, Any] = Field(description="The searched parameters' values.")
    objective: float | None = Field(description="The objective's value, once complete.")
    step: int | None = Field(None, description="The fine-tune's step.")
    total_steps: int | None = None
    intermediate: dict | None = Field(
        None, description="The last intermediate validation loss reported to the pruner: {step, valid_loss}."
    )
    evaluation_job: str | None = Field(None, description="The evaluation job that scored it (evaluation metrics).")
    adapter_file: str | None = Field(None, description="The trial's adapter archive (result_files[0]).")
    fine_tuned_model: str | None = None
    error: dict | None = Field(None, description="Why a failed trial failed (its job's error).")


class SweepProgress(BaseModel):
    trials_created: int
    trials_finished: int
    num_trials: int
    percent: float


class SweepObject(BaseModel):
    id: str
    object: Literal["sweep"] = "sweep"
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: str
    error: dict | None
    model: str
    training_file: str | None
    validation_file: str | None
    strategy: str
    num_trials: int
    max_parallel: int
    objective: dict = Field(description="metric, direction, and for evaluation metrics evaluation_file and settings.")
    pruning: dict | None
    search_space: dict
    seed: int
    fine_tuning: dict = Field(
        description="The base fine-tuning request, as sent; with a drawn `seed` when it gave none and the seed "
        "is not searched (every trial then shares it)."
    )
    progress: SweepProgress
    trials: list[Trial] = Field(description="Every trial so far, by number.")
    best_trial: Trial | None = Field(description="The best complete trial so far.")
    result: dict | None = Field(
        None,
        description="When finished: best_trial (with its adapter_file), counts, and files {report, plot, trials_csv}.",
    )
    result_files: list[str] = Field(description="[report JSON, objective plot PNG, trials CSV] once succeeded.")
    fine_tuned_model: str | None = Field(None, description="The best trial's fine-tuned model.")
    metadata: dict | None = None

    @classmethod
    def from_row(cls, job: Job, children: dict[str, Job]) -> SweepObject:
        spec = dict(job.spec)
        state = job.result or {}
        trials = [_trial(t, children.get(t["fine_tuning_job"])) for t in state.get("trials", [])]
        best = state.get("best_trial")
        best_trial = next((t for t in trials if best and t.number == best.get("number")), None)
        finished = sum(1 for t in trials if t.state not in ("running", "evaluating"))
        num_trials = spec["num_trials"]
        objective = dict(spec["objective"]) | {"direction": spec["direction"]}
        return cls(
            **job_times(job),
            error=job.error,
            training_file=job.training_file_id,
            validation_file=spec["fine_tuning"].get("validation_file"),
            strategy=spec["strategy"],
            num_trials=num_trials,
            max_parallel=spec["max_parallel"],
            objective={k: v for k, v in objective.items() if v is not None},
            pruning=spec.get("pruning"),
            search_space=spec["search_space"],
            seed=spec["seed"],
            fine_tuning=spec["fine_tuning"],
            progress=SweepProgress(
                trials_created=len(trials),
                trials_finished=finished,
                num_trials=num_trials,
                percent=round(100.0 * finished / num_trials, 1),
            ),
            trials=trials,
            best_trial=best_trial,
            result={k: v for k, v in state.items() if k != "trials"} or None,
            result_files=list(job.result_files or []),
            fine_tuned_model=job.fine_tuned_model,
            metadata=job.user_metadata,
        )


def _trial(stored: dict, child: Job | None) -> Trial:
    values = dict(stored)
    if child is not None:
        # The stored table is as of the reconciler's last pass; the job's own columns are fresher.
        values |= {"status": child.status, "step": child.step, "total_steps": child.total_steps}
        if child.error and not values.get("error"):
            values["error"] = child.error
    return Trial.model_validate(values)


class SweepEventObject(JobEventObject):
    object: Literal["sweep.event"] = "sweep.event"
    event_type: str = Field(
        description="created, queued, started, trial (a trial created, complete, pruned or failed), info, "
        "warning, cancelling, succeeded, failed or cancelled."
    )

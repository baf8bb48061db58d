"""What a sweep pass writes about its sweep: the summary of its trials (on the sweep's row, every pass) and, once
every trial has finished, the end: the report (JSON document, trials CSV, PNG plot of the objective against each
parameter) published as result files with a pointer to the best adapter, and the sweep's final status."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs.sweep_spec import RESULTS_PURPOSE, SweepSpec
from models.base import unix, utcnow
from models.file import File
from models.job import Job
from models.job_status import JobStatus
from models.results import publish_file
from models.transitions import switch_job_status
from worker.sweep_study import best_trial

REPORT_FILES = {"report": "report.json", "plot": "objective.png", "trials_csv": "trials.csv"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def params_text(params: dict) -> str:
    """A trial's parameters as event messages write them: `learning_rate=0.001, r=8`."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


class SweepReport:
    """The summary and the end of one sweep, from the trials a pass has just read and told optuna about."""

    def __init__(
        self, session: Session, sweep: Job, spec: SweepSpec, trials: dict[int, Job], evaluations: dict[str, Job], frozen
    ):
        self.session = session
        self.sweep = sweep
        self.spec = spec
        self.metric = spec.objective.metric
        self.sign = 1.0 if spec.direction == "minimize" else -1.0
        self.trials = trials  # optuna trial number -> fine-tuning job
        self.evaluations = evaluations  # trial job id -> its evaluation job
        self.frozen = frozen  # optuna trial number -> FrozenTrial

    # -- the summary -----------------------------------------------------------------------------------------

    def _trial_row(self, number: int, child: Job) -> dict:
        from optuna.trial import TrialState

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

    def summary(self) -> dict:
        rows = [self._trial_row(number, child) for number, child in sorted(self.trials.items())]
        best = best_trial(self.frozen.values(), self.sign)
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

    def store(self, summary: dict) -> None:
        """The summary on the sweep's row, written only where it changed."""
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

    # -- the end ---------------------------------------------------------------------------------------------

    def cancelled(self, summary: dict) -> None:
        self.store(summary)
        switch_job_status(
            self.session,
            self.sweep.id,
            JobStatus.cancelled,
            only_from={JobStatus.cancelling},
            message=f"Sweep cancelled after {summary['counts']['finished']} finished trials.",
            data={"counts": summary["counts"]},
        )

    def finish(self, summary: dict) -> None:
        """Every trial has finished: the sweep succeeds with its report, or fails if no trial completed."""
        best = summary["best_trial"]
        counts = summary["counts"]
        if best is None:
            self._fail(summary)
            return
        files = self._publish(summary)
        file_ids = {key: file.id for key, file in zip(REPORT_FILES, files, strict=True)}
        self.session.execute(
            update(Job)
            .where(Job.id == self.sweep.id)
            .values(
                result=summary | {"files": file_ids},
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
            f"{self.metric}={best['objective']:.6g} with {params_text(best['params'])}; "
            f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['failed']} failed.",
            data={"best_trial": best, "counts": counts, "result_files": [f.id for f in files]},
        )

    def _fail(self, summary: dict) -> None:
        counts = summary["counts"]
        failed = next((r for r in summary["trials"] if r["error"]), None)
        first = f" First failure: trial {failed['number']}: {failed['error'].get('message')}" if failed else ""
        error = {
            "code": "no_trial_completed",
            "message": f"None of the {counts['created']} trials completed ({counts['failed']} failed, "
            f"{counts['pruned']} pruned, {counts['cancelled']} cancelled).{first}",
            "param": None,
            "type": (failed["error"].get("type") if failed else None) or "user_error",
        }
        self.store(summary)
        switch_job_status(self.session, self.sweep.id, JobStatus.failed, only_from={JobStatus.running}, error=error)

    def _publish(self, summary: dict) -> list[File]:
        """The report, plot and trials CSV, published as the sweep's result files (in REPORT_FILES' order)."""
        with tempfile.TemporaryDirectory(prefix=f"{self.sweep.id}-") as tmp:
            folder = Path(tmp)
            (folder / REPORT_FILES["report"]).write_text(json.dumps(self._report_document(summary), indent=2))
            write_trials_csv(summary["trials"], list(self.spec.search_space), folder / REPORT_FILES["trials_csv"])
            plot_objective(summary["trials"], self.spec, folder / REPORT_FILES["plot"], self.sweep.id)
            return [
                publish_file(
                    self.session, self.sweep.project_id, folder / name, f"{self.sweep.id}-{name}",
                    RESULTS_PURPOSE, self.sweep.id,
                )
                for name in REPORT_FILES.values()
            ]  # fmt: skip

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

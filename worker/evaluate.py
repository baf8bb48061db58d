"""The evaluation stage: score each target on the evaluation file, publish the report, finish the job.

Runs under a held lease (worker/lease.py) like the fine-tuning stage: progress writes and the final
transaction are conditioned on it, and a cancel is honoured between batches (and between generated tokens).

Targets run one after the other. A target that fails (its model does not load, its archive was deleted) is
recorded in the report with its error and the others still run; the job then fails with `target_failed`
naming it, and its report (the other targets' results) is published all the same.

The report (a JSON file, result_files[0]) holds each metric per target, the difference of every later
target against the first, the settings used, and per-example outputs for the first `report_examples` rows;
`job.result` is the same without the per-example outputs. An evaluation that a fine-tuning job asked for
(`parent_id`) also copies its metrics into an `evaluation` event of that job and appends the report to its
result files.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select, update

from jobs.evaluation_data import label_set, read_items
from jobs.evaluation_spec import RESULTS_PURPOSE, EvaluationSpec
from models.config import get_settings
from models.db import session_scope
from models.errors import InvalidRequest
from models.job import Job
from models.job_kind import JobKind
from models.job_status import JobStatus
from models.results import publish_file
from models.storage import get_storage
from models.transitions import add_event
from worker.evaluate_steps import Progress, TargetResult, build_report, job_summary, load_backend, score_target
from worker.lease import Lease
from worker.stage_kit import (
    Stopped,
    adapter_file,
    classify_failure,
    confirm_cancelled,
    finish,
    load_job,
    write_under_lease,
)

log = logging.getLogger(__name__)


def _file_key(
    session, project_id: str, file_id: str | None, what: str, param: str, checkpoint_id: str | None = None
) -> str | None:
    if file_id is None:
        return None
    file = adapter_file(session, project_id, file_id, checkpoint_id)
    if file is None:
        raise InvalidRequest(f"The {what} {file_id} was deleted before the evaluation ran.", param=param)
    return file.storage_key


def run(job_id: str, lease: Lease) -> None:
    with session_scope() as session:
        job, spec = load_job(session, job_id, EvaluationSpec)
        data_key = _file_key(session, job.project_id, spec.evaluation_file, "evaluation_file", "evaluation_file")
        archives: list[str | None | Exception] = []
        for i, target in enumerate(spec.targets):
            try:
                archives.append(
                    _file_key(session, job.project_id, target.file_id, "archive", f"targets[{i}]", target.checkpoint_id)
                )
            except InvalidRequest as exc:
                archives.append(exc)

    storage = get_storage()  # keys: the stored files on a shared volume, downloaded copies from a bucket
    with storage.local_copy(data_key) as data_path:
        items = read_items(data_path, spec)
    labels = label_set(items, spec) if "accuracy" in spec.metrics else None
    passes = int(spec.needs_loss) + int(spec.needs_generation)
    progress = Progress(job.id, lease, len(spec.targets) * len(items) * passes)
    progress.flush()
    with session_scope() as session:
        add_event(
            session,
            job.id,
            "info",
            f"Evaluating {len(spec.targets)} targets on {len(items)} examples: {', '.join(spec.metrics)}.",
            data={"n_examples": len(items), "metrics": list(spec.metrics), "labels": labels},
        )

    work_root = get_settings().work_dir.resolve() / job.id
    shutil.rmtree(work_root, ignore_errors=True)
    results: list[TargetResult] = []
    try:
        for i, target in enumerate(spec.targets):
            result = TargetResult(target, i)
            started, done_before = time.monotonic(), progress.done
            backend = None
            try:
                if isinstance(archives[i], Exception):
                    raise archives[i]
                target_dir = work_root / f"target-{i}"
                archive = storage.fetch(archives[i], target_dir / "inputs") if archives[i] else None
                backend = load_backend(target, archive, target_dir)
                score_target(backend, items, spec, labels, progress, result)
            except Stopped:
                raise
            except Exception as exc:
                if lease.should_stop:
                    raise Stopped from exc
                log.exception("evaluation %s: target %s failed", job.id, target.name)
                result.error = classify_failure(exc)
                # The target's unfinished passes will not run: keep the progress total honest.
                progress.total -= len(items) * passes - (progress.done - done_before)
            finally:
                if backend is not None:
                    backend.close()
                del backend
                gc.collect()
                shutil.rmtree(work_root / f"target-{i}", ignore_errors=True)
            result.seconds = time.monotonic() - started
            results.append(result)
            _target_event(job.id, result, len(spec.targets))
        report = build_report(job, spec, items, labels, results)
        work_root.mkdir(parents=True, exist_ok=True)
        path = work_root / "report.json"
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
        _publish_and_finish(job, lease, report, path, results)
    except Stopped:
        confirm_cancelled(job.id, lease, f"Evaluation cancelled after {len(results)} of its targets.")
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def _target_event(job_id: str, result: TargetResult, n_targets: int) -> None:
    name = result.target.name
    with session_scope() as session:
        if result.error:
            add_event(
                session,
                job_id,
                "warning",
                f"Target {result.index + 1}/{n_targets} {name} failed: {result.error['message']}",
                data={"target": name, "error": result.error},
                level="error",
            )
        else:
            shown = ", ".join(f"{k}={v}" for k, v in result.metrics.items() if v is not None)
            add_event(
                session,
                job_id,
                "metrics",
                f"Target {result.index + 1}/{n_targets} {name}: {shown} ({result.seconds:.1f} s).",
                data={"target": name, "metrics": result.metrics, "seconds": round(result.seconds, 2)},
            )


def _publish_and_finish(job: Job, lease: Lease, report: dict, path: Path, results: list[TargetResult]) -> None:
    """Publish the report and finish in one transaction; where the switch loses (lease lost, a cancel came first)
    nothing lands and Stopped is raised."""
    failed = [r for r in results if r.error is not None]
    with session_scope() as session:
        file = publish_file(
            session, job.project_id, path, f"{job.id}-report.json", purpose=RESULTS_PURPOSE, job_id=job.id
        )
        summary = job_summary(report, file.id)
        write_under_lease(session, job.id, lease, result_files=[file.id], result=summary, estimated_finish=None)
        data = {"metrics": report["summary"], "report_file": file.id}
        if failed:
            first = failed[0]
            error = {
                "code": "target_failed",
                "message": f"Target {first.target.name} failed: {first.error['message']}"
                + (f" ({len(failed)} of {len(results)} targets failed)." if len(failed) > 1 else "")
                + " The other targets' results are in the report.",
                "param": f"targets[{first.index}]",
                "type": first.error.get("type", "system_error"),
            }
            finished = finish(session, job.id, lease, JobStatus.failed, error=error, data=data)
        else:
            finished = finish(session, job.id, lease, JobStatus.succeeded, message="Evaluation completed.", data=data)
        if finished and job.parent_id:
            _copy_to_parent(session, job, summary, file.id)
    if not finished:
        raise Stopped


def _copy_to_parent(session, job: Job, summary: dict, file_id: str) -> None:
    """A fine-tuning job's automatic evaluation: its metrics in the job's events and result files."""
    parent = session.scalar(select(Job).where(Job.id == job.parent_id, Job.project_id == job.project_id))
    if parent is None or parent.kind != JobKind.fine_tune:
        return
    session.execute(
        update(Job)
        .where(Job.id == parent.id)
        .values(result_files=[*(parent.result_files or []), file_id])
        .execution_options(synchronize_session=False)
    )
    shown = "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if v is not None)
        for name, metrics in summary["summary"].items()
    )
    add_event(
        session,
        parent.id,
        "evaluation",
        f"Evaluation {job.id} on the validation file: {shown}.",
        data={
            "evaluation_id": job.id,
            "report_file": file_id,
            "metrics": summary["summary"],
            "comparison": summary["comparison"],
        },
    )

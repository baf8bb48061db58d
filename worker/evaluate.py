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
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from jobs.evaluation_spec import RESULTS_PURPOSE, EvaluationSpec, Target
from models.base import unix, utcnow
from models.config import get_settings
from models.db import session_scope
from models.errors import InvalidRequest
from models.file import File
from models.job import Job
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.results import publish_file
from models.storage import get_storage
from models.transitions import add_event, switch_job_status
from worker.archives import unpack_tar
from worker.eval_data import EvalItem, label_set, loss_row, prompt_ids, read_items
from worker.eval_metrics import (
    bleu_score,
    comparison_rows,
    exact_matches,
    label_metrics,
    loss_metrics,
    rouge_l_scores,
    rounded,
)
from worker.lease import Lease, confirm_cancelled

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 2.0
PROMPT_CHARS_IN_REPORT = 2000


class Stopped(Exception):
    """The job was cancelled (or its lease lost) while a target was being scored."""


@dataclass
class TargetResult:
    target: Target
    index: int
    metrics: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    error: dict | None = None
    seconds: float = 0.0
    # Per example, for the report's first rows.
    texts: list[str] | None = None
    losses: list[float | None] | None = None
    exact: list[bool] | None = None
    predicted: list[str | None] | None = None
    correct: list[bool] | None = None
    rouge: list[float] | None = None

    def summary(self) -> dict:
        t = self.target
        return {
            "name": t.name,
            "type": t.type,
            "backend": t.backend,
            "model": t.model,
            "job_id": t.job_id,
            "checkpoint_id": t.checkpoint_id,
            "step": t.step,
            "adapter": t.adapter,
            "status": "failed" if self.error else "succeeded",
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "metrics": self.metrics,
        }


class Progress:
    """Examples scored so far across all targets and passes, written to the job every few seconds."""

    def __init__(self, job_id: str, lease: Lease, total: int):
        self.job_id = job_id
        self.lease = lease
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_write = 0.0

    def poll(self) -> None:
        if self.lease.should_stop:
            raise Stopped

    def advance(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last_write >= PROGRESS_EVERY_SECONDS or self.done >= self.total:
            self.write()

    def write(self) -> None:
        self.last_write = time.monotonic()
        elapsed = self.last_write - self.started
        remaining = elapsed / self.done * (self.total - self.done) if self.done else None
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.lease_owner == self.lease.owner)
                .values(
                    step=min(self.done, self.total),
                    total_steps=self.total,
                    estimated_finish=utcnow() + timedelta(seconds=remaining) if remaining is not None else None,
                )
                .execution_options(synchronize_session=False)
            )


def _file_key(session, project_id: str, file_id: str | None, what: str, param: str) -> str | None:
    if file_id is None:
        return None
    file = session.scalar(select(File).where(File.id == file_id, File.project_id == project_id))
    if file is None:
        raise InvalidRequest(f"The {what} {file_id} was deleted before the evaluation ran.", param=param)
    return file.storage_key


def _extract(archive: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    return unpack_tar(archive, dest)


def load_backend(target: Target, archive: Path | None, work_dir: Path):
    """The target's model, ready to score; raises if it cannot be loaded."""
    from worker.eval_backends import OnnxBackend, TorchBackend, package_root

    if target.type == "model":
        return TorchBackend(resolve_model(target.model).path)
    if archive is None:
        raise FileNotFoundError(f"target {target.name} has no archive")
    if target.type == "fine_tuning_job":
        adapter_dir = _extract(archive, work_dir / "adapter")
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError("the adapter archive holds no adapter_config.json")
        return TorchBackend(resolve_model(target.model).path, adapter_dir)
    root = package_root(_extract(archive, work_dir / "package"))
    adapter_file = None
    if target.adapter is not None:
        adapter_file = (root / (target.adapter_file or f"adapters/{target.adapter}.onnx_adapter")).resolve()
        if not adapter_file.is_relative_to(root.resolve()):
            raise FileNotFoundError(f"adapter file {target.adapter_file!r} is outside the package")
    return OnnxBackend(root, target.adapter, adapter_file)


def score_target(
    backend, items: list[EvalItem], spec: EvaluationSpec, labels: list[str] | None, progress: Progress, result
) -> None:
    """Fill `result` with the target's metrics (only those the spec asks for) and per-example outputs."""
    from worker.eval_backends import cut_at_stop

    tokenizer = backend.tokenizer
    asked = set(spec.metrics)
    metrics: dict = {}
    details: dict = {"backend": backend.name, "n_examples": len(items)}
    if spec.needs_loss:
        rows, cut = [], 0
        for item in items:
            row, truncated = loss_row(item, tokenizer, spec.max_seq_len)
            rows.append(row)
            cut += truncated
        scores = backend.score(rows, progress.poll, progress.advance)
        summary = loss_metrics(scores)
        metrics |= {k: summary[k] for k in ("loss", "perplexity", "token_accuracy") if k in asked}
        details |= {
            "n_loss_tokens": summary["n_tokens"],
            "n_truncated": cut,
            "n_without_completion_tokens": sum(row is None for row in rows),
        }
        result.losses = [rounded(s.mean_loss) if s is not None and s.n_tokens else None for s in scores]
    if spec.needs_generation:
        max_prompt = max(1, spec.max_seq_len - spec.generation.max_new_tokens)
        prompts, cut = [], 0
        for item in items:
            ids, was_cut = prompt_ids(item, tokenizer, max_prompt)
            prompts.append(ids)
            cut += was_cut
        started = time.monotonic()
        generated = backend.generate(prompts, spec.generation, progress.poll, progress.advance)
        seconds = time.monotonic() - started
        texts = [
            cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), spec.generation.stop) for ids in generated
        ]
        references = [item.reference for item in items]
        result.texts = texts
        details |= {
            "n_prompts_cut": cut,
            "generated_tokens": sum(len(ids) for ids in generated),
            "generation_seconds": round(seconds, 2),
            "generated_tokens_per_second": round(sum(len(ids) for ids in generated) / seconds, 1) if seconds else None,
        }
        if "exact_match" in asked:
            result.exact = exact_matches(texts, references, spec.normalization)
            metrics["exact_match"] = rounded(sum(result.exact) / len(items))
        if "accuracy" in asked:
            found = label_metrics(texts, [item.label for item in items], spec.labels, labels or [])
            metrics["accuracy"] = found["accuracy"]
            result.predicted, result.correct = found["predicted"], found["correct"]
            details |= {
                "accuracy_match": found["match"],
                "accuracy_by_match": found["accuracy_by_match"],
                "confusion_matrix": found["confusion_matrix"],
            }
        if "rouge_l" in asked:
            result.rouge = rouge_l_scores(texts, references)
            metrics["rouge_l"] = rounded(sum(result.rouge) / len(items))
        if "bleu" in asked:
            metrics["bleu"] = rounded(bleu_score(texts, references), 4)
    result.metrics = {m: metrics.get(m) for m in spec.metrics}
    result.details = details


def build_report(job: Job, spec: EvaluationSpec, items: list[EvalItem], labels, results: list[TargetResult]) -> dict:
    names = [r.target.name for r in results]
    per_target = {r.target.name: r.metrics for r in results if r.error is None}
    settings = spec.settings().model_dump(mode="json")
    settings["labels"]["resolved_labels"] = labels
    report = {
        "object": "evaluation.report",
        "evaluation_id": job.id,
        "created_at": unix(utcnow()),
        "evaluation_file": spec.evaluation_file,
        "n_examples": len(items),
        "metrics": list(spec.metrics),
        "generation": spec.generation.model_dump(mode="json") | {"used": spec.needs_generation},
        "settings": settings,
        "targets": [r.summary() | {"details": r.details} for r in results],
        "summary": per_target,
        "comparison": comparison_rows(names, per_target, list(spec.metrics)) if not results[0].error else [],
    }
    examples = []
    for item in items[: spec.report_examples]:
        outputs = {}
        for r in results:
            if r.error is not None:
                continue
            out: dict = {}
            i = item.index
            if r.losses is not None:
                out["loss"] = r.losses[i]
            if r.texts is not None:
                out["text"] = r.texts[i]
            if r.exact is not None:
                out["exact_match"] = r.exact[i]
            if r.predicted is not None:
                out["predicted_label"] = r.predicted[i]
                out["correct"] = r.correct[i]
            if r.rouge is not None:
                out["rouge_l"] = rounded(r.rouge[i])
            outputs[r.target.name] = out
        examples.append(
            {
                "index": item.index,
                "line": item.line,
                "prompt": item.prompt_text()[-PROMPT_CHARS_IN_REPORT:],
                "reference": item.reference,
                "label": item.label if "accuracy" in spec.metrics else None,
                "outputs": outputs,
            }
        )
    report["examples"] = examples
    return report


def job_summary(report: dict, report_file_id: str) -> dict:
    """What `job.result` keeps: the report without per-example outputs and per-target details."""
    summary = {k: v for k, v in report.items() if k not in ("examples", "targets", "settings")}
    summary["targets"] = [{k: v for k, v in t.items() if k != "details"} for t in report["targets"]]
    for target, full in zip(summary["targets"], report["targets"], strict=True):
        if "accuracy_by_match" in full["details"]:
            target["accuracy_by_match"] = full["details"]["accuracy_by_match"]
    summary["report_file"] = report_file_id
    return summary


def run(job_id: str, lease: Lease) -> None:
    from worker.tasks import classify_failure

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        spec = EvaluationSpec.model_validate(job.spec)
        data_key = _file_key(session, job.project_id, spec.evaluation_file, "evaluation_file", "evaluation_file")
        archives: list[str | None | Exception] = []
        for i, target in enumerate(spec.targets):
            try:
                archives.append(_file_key(session, job.project_id, target.file_id, "archive", f"targets[{i}]"))
            except InvalidRequest as exc:
                archives.append(exc)

    storage = get_storage()  # keys: the stored files on a shared volume, downloaded copies from a bucket
    with storage.local_copy(data_key) as data_path:
        items = read_items(data_path, spec)
    labels = label_set(items, spec) if "accuracy" in spec.metrics else None
    passes = int(spec.needs_loss) + int(spec.needs_generation)
    progress = Progress(job.id, lease, len(spec.targets) * len(items) * passes)
    progress.write()
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
                _finish_stopped(job, lease, len(results))
                return
            except Exception as exc:
                if lease.should_stop:
                    _finish_stopped(job, lease, len(results))
                    return
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
    failed = [r for r in results if r.error is not None]
    with session_scope() as session:
        file = publish_file(
            session, job.project_id, path, f"{job.id}-report.json", purpose=RESULTS_PURPOSE, job_id=job.id
        )
        summary = job_summary(report, file.id)
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.lease_owner == lease.owner)
            .values(result_files=[file.id], result=summary, estimated_finish=None)
            .execution_options(synchronize_session=False)
        )
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
            finished = switch_job_status(
                session,
                job.id,
                JobStatus.failed,
                only_from={JobStatus.running},
                lease_owner=lease.owner,
                error=error,
                data=data,
            )
        else:
            finished = switch_job_status(
                session,
                job.id,
                JobStatus.succeeded,
                only_from={JobStatus.running},
                lease_owner=lease.owner,
                message="Evaluation completed.",
                data=data,
            )
        if finished and job.parent_id:
            _copy_to_parent(session, job, summary, file.id)
        if not finished:
            session.rollback()
    if not finished:
        _finish_stopped(job, lease, len(results))


def _copy_to_parent(session, job: Job, summary: dict, file_id: str) -> None:
    """A fine-tuning job's automatic evaluation: its metrics in the job's events and result files."""
    parent = session.scalar(select(Job).where(Job.id == job.parent_id, Job.project_id == job.project_id))
    if parent is None or parent.kind != "fine_tune":
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


def _finish_stopped(job: Job, lease: Lease, n_done: int) -> None:
    confirm_cancelled(job.id, lease, f"Evaluation cancelled after {n_done} of its targets.")

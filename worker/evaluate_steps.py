"""The evaluation stage's steps (worker/evaluate.py): load a target, score it on the evaluation file, report.

A target is scored in up to two passes over the examples (loss, then generation), each only if a metric asks for
it; `Progress` counts the examples scored across all targets and passes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.evaluation_data import EvalItem
from jobs.evaluation_spec import EvaluationSpec, Target
from models.base import unix, utcnow
from models.db import session_scope
from models.job import Job
from models.model_store import resolve_model
from worker.archives import unpack_tar
from worker.eval_data import loss_row, prompt_ids
from worker.eval_metrics import (
    bleu_score,
    comparison_rows,
    exact_matches,
    label_metrics,
    loss_metrics,
    rouge_l_scores,
    rounded,
)
from worker.lease import Lease
from worker.stage_kit import StageProgress, finish_at

PROGRESS_EVERY_SECONDS = 2.0
PROMPT_CHARS_IN_REPORT = 2000


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


class Progress(StageProgress):
    """Examples scored so far across all targets and passes, written to the job every few seconds."""

    def __init__(self, job_id: str, lease: Lease, total: int):
        super().__init__(job_id, lease)
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_write = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last_write >= PROGRESS_EVERY_SECONDS or self.done >= self.total:
            self.flush()

    def flush(self) -> None:
        self.last_write = time.monotonic()
        elapsed = self.last_write - self.started
        remaining = elapsed / self.done * (self.total - self.done) if self.done else None
        with session_scope() as session:
            self.write(
                session, step=min(self.done, self.total), total_steps=self.total, estimated_finish=finish_at(remaining)
            )


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
        scores = backend.score(rows, progress.check_stop, progress.advance)
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
        generated = backend.generate(prompts, spec.generation, progress.check_stop, progress.advance)
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

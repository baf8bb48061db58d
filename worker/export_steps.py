"""The export stage's steps (worker/export.py): the parity gate's prompts and checks, and the package's manifest
(its fields are listed in export.py's docstring)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from jobs.export_spec import FIXED_PROMPTS, ExportSpec
from models.base import utcnow
from models.datasets import parse_template, render_template
from models.errors import InvalidRequest
from models.job import Job
from models.model_store import load_options
from models.storage import get_storage
from worker.stage_kit import project_file

MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_records(path: Path, n: int) -> list[dict]:
    records = []
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                records.append(json.loads(raw))
            if len(records) >= n:
                break
    return records


def prompt_of(record: dict, text_template: str | None, chat_renderer) -> str | None:
    """The part of an example before its answer: what a client would send to the model."""
    if "messages" in record:
        messages = record["messages"]
        last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        context = [{"role": m["role"], "content": m["content"]} for m in messages[:last_assistant]]
        return chat_renderer(context) if context else None
    if "prompt" in record:
        return record.get("prompt")
    if text_template:
        # Cut the template before its last field ("{text} -> {label}" gives "<text> -> "); a template that is
        # its last field alone is rendered whole. The parser refuses format specs (a spec can pad to gigabytes).
        try:
            parts = parse_template(text_template)
        except InvalidRequest:
            return None
        fields = [i for i, (_, name) in enumerate(parts) if name is not None]
        last = fields[-1] if fields else len(parts)
        head = parts[:last] + [(parts[last][0], None)] if last < len(parts) else parts
        if not any(literal or name for literal, name in head):
            head = parts
        try:
            return render_template(head, record)
        except KeyError:
            return None
    return None


def gate_prompts(spec: ExportSpec, session, project_id: str, base_dir: Path) -> tuple[list[str], str]:
    """The gate's prompts and where they came from."""
    if spec.gate.prompts:
        return list(spec.gate.prompts), "request"
    n = spec.gate.n_prompts
    if spec.adapters:
        parent = session.get(Job, spec.adapters[0].fine_tuning_job)
        parent_spec = (parent.spec or {}) if parent is not None else {}
        for key in ("validation_file", "training_file"):
            file_id = parent_spec.get(key)
            if not file_id:
                continue
            file = project_file(session, project_id, file_id)
            if file is None:
                continue
            renderer = _chat_renderer(base_dir)
            with get_storage().local_copy(file.storage_key) as path:
                records = _first_records(path, n)
            prompts = [p for p in (prompt_of(r, parent_spec.get("text_template"), renderer) for r in records) if p]
            if prompts:
                return prompts, f"{key} {file_id}"
    return FIXED_PROMPTS[:n], "fixed"


def _chat_renderer(base_dir: Path):
    loaded = []

    def render(messages: list[dict]) -> str:
        from transformers import AutoTokenizer

        if not loaded:
            loaded.append(AutoTokenizer.from_pretrained(str(base_dir), **load_options(base_dir.name, weights=False)))
        tokenizer = loaded[0]
        try:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # no chat template: plain turns
            return "\n".join(m["content"] for m in messages)

    return render


def gate_checks(spec: ExportSpec, mode: str | None) -> list:
    from worker.onnx_gate import Check

    if mode == "multi":
        return [Check("base", None, None)] + [Check(a.name, a.name, a.name) for a in spec.adapters]
    if mode in ("merged", "separate"):
        return [Check(spec.adapters[0].name, None, spec.adapters[0].name)]
    return [Check("base", None, None)]


def gate_message(gate) -> str:
    report = gate.report
    parts = []
    for check in gate.failures():
        diff = check["mean_abs_logit_diff"]
        parts.append(
            f"{check['check']}: {check['token_match']:.0%} of {check['positions']} greedy tokens match PyTorch "
            f"(need {report['min_token_match']:.0%}), mean |logit diff| "
            f"{'not finite' if diff is None else f'{diff:.4g}'} (limit {report['max_mean_abs_logit_diff']:.4g})"
        )
    return "The exported model failed the parity gate: " + "; ".join(parts) + "."


def build_manifest(
    job, spec, base, package, build_result, gate_report, lora_inputs, adapter_files, adapter_inputs
) -> dict:
    import onnxruntime
    import onnxruntime_genai

    onnx_file = package / "model.onnx"
    data_file = package / "model.onnx.data"
    weights = sorted(base.path.glob("*.safetensors"))
    source_sha = sha256_of(weights[0]) if len(weights) == 1 else None
    adapters = []
    for adapter in spec.adapters:
        entry = {
            "name": adapter.name,
            "job_id": adapter.fine_tuning_job,
            "checkpoint_id": adapter.checkpoint,
            "step": adapter.step,
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "target_modules": adapter.target_modules,
            "merged": spec.adapter_mode == "merged",
            "file": None,
            "bytes": None,
            "sha256": None,
            "onnx_inputs": adapter_inputs.get(adapter.name, []),
        }
        path = adapter_files.get(adapter.name)
        if path is not None:
            entry |= {
                "file": str(path.relative_to(package)),
                "bytes": path.stat().st_size,
                "sha256": sha256_of(path),
            }
        adapters.append(entry)
    contents = {
        str(p.relative_to(package)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in sorted(package.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": "grove.onnx-package",
        "version": 1,
        "export_job_id": job.id,
        "created_at": utcnow().isoformat(),
        "base_model": {
            "name": spec.model,
            "source_sha256": source_sha,
            "onnx_file": onnx_file.name,
            "sha256": sha256_of(onnx_file),
            "data_file": data_file.name if data_file.exists() else None,
            "data_sha256": sha256_of(data_file) if data_file.exists() else None,
        },
        "precision": spec.precision,
        "execution_provider": spec.execution_provider,
        "adapter_mode": spec.adapter_mode if spec.adapters else None,
        "quantization": spec.quantization.model_dump() if spec.precision in ("int4", "int8") else None,
        "lora_inputs": lora_inputs,
        "adapters": adapters,
        "gate": gate_report,
        "builder": {
            "onnxruntime_genai": onnxruntime_genai.__version__,
            "onnxruntime": onnxruntime.__version__,
            "seconds": round(build_result.seconds, 2),
            # The command line without this worker's paths.
            "arguments": [a for a in build_result.command[3:] if not a.startswith("/")],
        },
        "contents": contents,
    }
    return manifest

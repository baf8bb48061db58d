"""The export stage: build an onnxruntime-genai model package, verify it, publish it.

Runs under a held lease (worker/lease.py), like the fine-tuning stage. Phases, each an event and a
progress step (step/total_steps on the job): prepare (unpack the adapters), build (the model builder, as
a subprocess a cancel kills), package (multi: LoRA weights become graph inputs, one `.onnx_adapter` per
adapter), verify (the parity gate, worker/onnx_gate.py), publish. A failed gate fails the job with
code `parity_gate_failed` and publishes nothing. A cancel is honoured between phases and during the build
and the gate.

Adapter modes:
- merged: the adapter is folded into the base weights (peft merge_and_unload), then built and quantized
  like a base model;
- separate: built with the builder's `adapter_path`: each LoRA pair stays its own MatMul, with the LoRA
  weights kept unquantized;
- multi: built like separate from the first adapter; the LoRA weights are then graph inputs whose
  defaults are zero (no adapter active = the base model), and every adapter is written as
  `adapters/<name>.onnx_adapter` (onnxruntime.AdapterFormat) to be activated with
  `og.Adapters(model).load(path, name)` and `generator.set_active_adapter(adapters, name)`.

Result contract (relied on by evaluation jobs and clients). When an export job succeeds:
- `result_files[0]` is the package archive, `<job>-onnx.tar` (uncompressed tar). Its root holds
  `genai_config.json`, the ONNX model (`model.onnx` + `model.onnx.data`), the tokenizer files
  (`tokenizer.json`, `tokenizer_config.json`, chat template) and `manifest.json`; a multi package also
  holds `adapters/<name>.onnx_adapter`. `og.Model(<extracted dir>)` loads it as is.
- `result_files[1]` is `manifest.json` alone, then each `.onnx_adapter` alone (so a client can fetch one
  adapter without the base).
- `job.result` is the manifest dict plus `files` ({path in the archive: file id} for the files published
  on their own) and `archive` ({file_id, filename, bytes, sha256}).

The manifest (`manifest.json`):
    format "grove.onnx-package", version 1, export_job_id, created_at,
    base_model {name, source_sha256 (the store's weights), onnx_file, sha256, data_file, data_sha256},
    precision, execution_provider, adapter_mode (null for a base model), quantization {method,
    int8_sensitive_layers, block_size, accuracy_level} (int4/int8), lora_inputs (multi: every LoRA graph input name),
    adapters [{name, job_id, checkpoint_id, step, rank, alpha, target_modules, merged, file (path in the
    archive, multi only), bytes, sha256, onnx_inputs (the input names it fills)}],
    gate {passed, prompts, max_new_tokens, min_token_match, max_mean_abs_logit_diff, reference,
    checks [{check, adapter, positions, token_match, mean_abs_logit_diff, max_abs_logit_diff, passed, sample}]},
    builder {onnxruntime_genai, onnxruntime, seconds, arguments}, contents {path: {bytes, sha256}}.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from jobs.export_spec import ExportSpec
from models.config import get_settings
from models.db import session_scope
from models.errors import InvalidRequest
from models.job import Job
from models.job_status import JobStatus
from models.model_store import resolve_model
from models.results import publish_file
from models.storage import get_storage
from models.transitions import add_event
from worker.archives import pack_tar, unpack_tar
from worker.export_steps import MANIFEST, build_manifest, gate_checks, gate_message, gate_prompts
from worker.lease import Lease
from worker.stage_kit import (
    StageProgress,
    Stopped,
    adapter_file,
    confirm_cancelled,
    fail,
    finish,
    load_job,
    system_error,
    write_under_lease,
)

log = logging.getLogger(__name__)

RESULTS_PURPOSE = "export-results"
PHASES = ["prepare", "build", "package", "verify", "publish"]


class Progress(StageProgress):
    """Phase events and step/total_steps on the job, written only while this worker holds the lease."""

    def phase(self, name: str, message: str, data: dict | None = None) -> None:
        self.check_stop()
        step = PHASES.index(name)
        with session_scope() as session:
            self.write(session, step=step, total_steps=len(PHASES))
            add_event(session, self.job_id, "info", message, data={"phase": name, "step": step} | (data or {}))

    def event(self, message: str, data: dict | None = None, level: str = "info") -> None:
        with session_scope() as session:
            add_event(session, self.job_id, "warning" if level == "warn" else "info", message, data, level=level)


def _stored_key(session, project_id: str, file_id: str, what: str, checkpoint_id: str | None = None) -> str:
    file = adapter_file(session, project_id, file_id, checkpoint_id)
    if file is None:
        raise InvalidRequest(f"The {what} file {file_id} was deleted before the export ran.", code="file_not_found")
    return file.storage_key


def _unpack(archive: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    return unpack_tar(archive, destination)


# --- the stage -----------------------------------------------------------------------------------


def run(job_id: str, lease: Lease) -> None:
    with session_scope() as session:
        job, spec = load_job(session, job_id, ExportSpec)
        archives = {
            a.name: _stored_key(session, job.project_id, a.file_id, "adapter", a.checkpoint) for a in spec.adapters
        }
    base = resolve_model(spec.model, param="source.model")
    work_dir = get_settings().work_dir.resolve() / job.id
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    progress = Progress(job.id, lease)
    try:
        _run(job, spec, base, archives, work_dir, progress, lease)
    except Stopped:
        confirm_cancelled(job.id, lease, "Export cancelled.")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run(job: Job, spec: ExportSpec, base, archives: dict[str, str], work_dir: Path, progress, lease) -> None:
    from worker import onnx_build, onnx_gate, onnx_package

    progress.phase("prepare", f"Preparing {spec.model} and {len(spec.adapters)} adapter(s).")
    storage = get_storage()  # archives are storage keys: fetched into the work directory unless on a shared volume
    adapter_dirs = {
        name: _unpack(storage.fetch(key, work_dir / "inputs"), work_dir / "adapters" / name)
        for name, key in archives.items()
    }
    with session_scope() as session:
        prompts, prompt_source = gate_prompts(spec, session, job.project_id, base.path)

    mode = spec.adapter_mode if spec.adapters else None
    progress.phase("build", f"Building the {spec.precision} {spec.execution_provider} model ({mode or 'base model'}).")
    package = work_dir / "package"
    build_args = {
        "cache_dir": work_dir / "builder-cache",
        "block_size": spec.quantization.block_size,
        "accuracy_level": spec.quantization.accuracy_level,
        "quantization_method": spec.quantization.method,
        "int8_sensitive_layers": spec.quantization.int8_sensitive_layers,
        "should_stop": lambda: lease.should_stop,
    }
    first = spec.adapters[0] if spec.adapters else None
    try:
        if mode == "merged":
            merged = onnx_build.merge_adapter(base.path, adapter_dirs[first.name], work_dir / "merged")
            result = onnx_build.build(merged, package, spec.precision, spec.execution_provider, **build_args)
            shutil.rmtree(merged, ignore_errors=True)
        elif mode in ("separate", "multi"):
            exclude = onnx_build.lora_node_names(onnx_build.num_hidden_layers(base.path), first.target_modules)
            result = onnx_build.build(
                base.path,
                package,
                spec.precision,
                spec.execution_provider,
                adapter_dir=adapter_dirs[first.name],
                exclude_nodes=exclude,
                **build_args,
            )
        else:
            result = onnx_build.build(base.path, package, spec.precision, spec.execution_provider, **build_args)
    except onnx_build.BuildStopped:
        raise Stopped() from None
    except onnx_build.BuildFailed as exc:
        fail(job.id, lease, system_error("export_build_failed", f"The ONNX build failed: {exc}"))
        return
    progress.event(f"Built in {result.seconds:.1f} s.", data={"phase": "build", "seconds": round(result.seconds, 2)})

    progress.phase("package", "Packaging the model and its adapters.")
    lora_inputs: list[str] = []
    adapter_files: dict[str, Path] = {}
    adapter_inputs: dict[str, list[str]] = {}
    try:
        if mode == "multi":
            inputs = onnx_package.make_lora_inputs(package)
            lora_inputs = sorted(inputs)
            for adapter in spec.adapters:
                path = package / "adapters" / f"{adapter.name}.onnx_adapter"
                adapter_inputs[adapter.name] = onnx_package.write_onnx_adapter(adapter_dirs[adapter.name], inputs, path)
                adapter_files[adapter.name] = path
        elif mode == "separate":
            baked = onnx_package.lora_initializers(package / "model.onnx")
            if not baked:
                raise onnx_package.PackageError("the built model has no LoRA MatMuls")
            adapter_inputs[first.name] = []
    except onnx_package.PackageError as exc:
        fail(job.id, lease, system_error("export_package_failed", f"Packaging failed: {exc}"))
        return

    progress.phase("verify", f"Verifying against PyTorch on {len(prompts)} prompt(s) ({prompt_source}).")
    checks = gate_checks(spec, mode)
    try:
        gate = onnx_gate.run_gate(
            package,
            base.path,
            checks,
            prompts,
            adapter_dirs=adapter_dirs,
            onnx_adapters=adapter_files or None,
            max_new_tokens=spec.gate.max_new_tokens,
            min_token_match=spec.gate.min_token_match,
            max_mean_abs_logit_diff=spec.gate.max_mean_abs_logit_diff,
            provider=spec.execution_provider,
            should_stop=lambda: lease.should_stop,
        )
    except onnx_gate.GateStopped:
        raise Stopped() from None
    gate.report["prompt_source"] = prompt_source
    if not gate.passed:
        progress.event("Parity gate failed; nothing is published.", data=gate.report, level="warn")
        fail(job.id, lease, system_error("parity_gate_failed", gate_message(gate)))
        return
    progress.event(
        "Parity gate passed: "
        + "; ".join(f"{c['check']}: {c['token_match']:.0%} tokens" for c in gate.report["checks"]),
        data=gate.report,
    )

    progress.phase("publish", "Publishing the package.")
    manifest = build_manifest(job, spec, base, package, result, gate.report, lora_inputs, adapter_files, adapter_inputs)
    (package / MANIFEST).write_text(json.dumps(manifest, indent=2))
    archive = _pack(package, work_dir / f"{job.id}-onnx.tar")
    _publish_and_succeed(job, lease, spec, manifest, archive, package, adapter_files)


def _pack(package: Path, archive: Path) -> Path:
    """An uncompressed tar of the package (weights do not compress); manifest.json first."""
    return pack_tar(package, archive, first=MANIFEST)


def _publish_and_succeed(job, lease, spec, manifest, archive, package, adapter_files) -> None:
    """Publish the package and succeed in one transaction; where the switch loses (lease lost, a cancel came
    first) nothing lands and Stopped is raised."""
    with session_scope() as session:
        archive_file = publish_file(
            session, job.project_id, archive, archive.name, purpose=RESULTS_PURPOSE, job_id=job.id
        )
        manifest_file = publish_file(
            session,
            job.project_id,
            package / MANIFEST,
            f"{job.id}-manifest.json",
            purpose=RESULTS_PURPOSE,
            job_id=job.id,
        )
        files = {MANIFEST: manifest_file.id}
        for name, path in adapter_files.items():
            published = publish_file(
                session, job.project_id, path, f"{job.id}-{name}.onnx_adapter", purpose=RESULTS_PURPOSE, job_id=job.id
            )
            files[str(path.relative_to(package))] = published.id
        archive_info = {
            "file_id": archive_file.id,
            "filename": archive_file.filename,
            "bytes": archive_file.bytes,
            "sha256": archive_file.sha256,
        }
        result = manifest | {"files": files, "archive": archive_info}
        write_under_lease(
            session,
            job.id,
            lease,
            result_files=[archive_file.id, *files.values()],
            result=result,
            step=len(PHASES),
            total_steps=len(PHASES),
            estimated_finish=None,
        )
        succeeded = finish(
            session,
            job.id,
            lease,
            JobStatus.succeeded,
            message=f"Export published: {archive_file.filename} ({archive_file.bytes} bytes).",
            data={"archive": archive_info, "result_files": [archive_file.id, *files.values()]},
        )
    if not succeeded:
        raise Stopped

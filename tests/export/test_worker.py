"""The export stage, run in-process as a worker runs it: build, package, parity gate, publish.

Every precision the CPU runs (fp32, int8, int4) and every adapter mode (multi, merged, separate) is built
once here on tiny-llama-test with adapters trained in the session; the whole matrix is a slow test.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from tests.export.conftest import create_export, run_in_process, untar
from worker.lease import wait_for


def run_export(client, auth, **body) -> dict:
    response = create_export(client, auth, **body)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    assert run_in_process(job_id, "export") in ("done", "failed")
    return client.get(f"/v1/exports/{job_id}", headers=auth).json()


def download(client, auth, file_id: str, **headers):
    return client.get(f"/v1/files/{file_id}/content", headers=auth | headers)


def published_files(job_id: str) -> int:
    from models.db import session_scope
    from models.file import File

    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(File).where(File.job_id == job_id))


def og_generate(model, tokenizer, prompt: str, n: int, adapters=None, name: str | None = None) -> list[int]:
    import onnxruntime_genai as og

    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


def torch_generate(tiny_model, adapter_dir, ids: list[int], n: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2
        )
    return out[0, len(ids) :].tolist()


def test_multi_package_switches_adapters_at_run_time(client, trained, tiny_model, tmp_path):
    import onnxruntime_genai as og

    a, b = trained.jobs["a"], trained.jobs["b"]
    job = run_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": a}, {"fine_tuning_job": b}]},
        precision="fp32",
        adapter_mode="multi",
    )
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 5, "total_steps": 5, "percent": 100.0}
    manifest = job["result"]
    assert manifest["format"] == "grove.onnx-package" and manifest["export_job_id"] == job["id"]
    assert manifest["precision"] == "fp32" and manifest["execution_provider"] == "cpu"
    assert manifest["adapter_mode"] == "multi" and manifest["base_model"]["name"] == "tiny-llama-test"
    assert [(x["name"], x["job_id"], x["file"], x["rank"]) for x in manifest["adapters"]] == [
        ("a", a, "adapters/a.onnx_adapter", 8),
        ("b", b, "adapters/b.onnx_adapter", 8),
    ]
    # 2 layers x (q_proj, v_proj) x (A, B): every adapter fills every LoRA input.
    assert len(manifest["lora_inputs"]) == 8
    assert all(x["onnx_inputs"] == manifest["lora_inputs"] for x in manifest["adapters"])
    gate = manifest["gate"]
    assert gate["passed"] and [c["check"] for c in gate["checks"]] == ["base", "a", "b"]
    assert all(c["token_match"] == 1.0 for c in gate["checks"]) and gate["prompt_source"].startswith("validation")

    # result_files: the archive, then manifest.json and each adapter on its own.
    archive_id = job["result_files"][0]
    assert job["result_files"] == [archive_id, *manifest["files"].values()]
    assert set(manifest["files"]) == {"manifest.json", "adapters/a.onnx_adapter", "adapters/b.onnx_adapter"}
    whole = download(client, trained.auth, archive_id)
    assert whole.status_code == 200 and len(whole.content) == manifest["archive"]["bytes"]
    assert hashlib.sha256(whole.content).hexdigest() == manifest["archive"]["sha256"]
    assert whole.headers["etag"] == f'"{manifest["archive"]["sha256"]}"'
    ranged = download(client, trained.auth, archive_id, Range="bytes=100-199")
    assert ranged.status_code == 206 and ranged.content == whole.content[100:200]
    single = download(client, trained.auth, manifest["files"]["adapters/b.onnx_adapter"]).content
    assert hashlib.sha256(single).hexdigest() == manifest["adapters"][1]["sha256"]

    package = untar(whole.content, tmp_path / "package")
    for name in ("genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "manifest.json"):
        assert (package / name).is_file(), name
    on_disk = json.loads((package / "manifest.json").read_text())
    assert on_disk["adapters"] == manifest["adapters"] and on_disk["gate"]["passed"]

    # A client: one model, adapters switched per generator, no reload; none active = the base model.
    model = og.Model(str(package))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    for x in manifest["adapters"]:
        adapters.load(str(package / x["file"]), x["name"])
    prompt = "i feel so happy today ->"
    outputs = {name: og_generate(model, tokenizer, prompt, 8, adapters, name) for name in (None, "a", "b")}
    assert outputs["a"] != outputs["b"] and outputs["a"] != outputs[None] and outputs["b"] != outputs[None]
    # fp32: the same greedy tokens as PyTorch, with each adapter and with none.
    adapter_dirs = {}
    for name, job_id in (("a", a), ("b", b)):
        tar = download(
            client,
            trained.auth,
            client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=trained.auth).json()["result_files"][0],
        )
        adapter_dirs[name] = untar(tar.content, tmp_path / f"adapter-{name}")
    ids = [int(t) for t in tokenizer.encode(prompt)]
    assert outputs[None] == torch_generate(tiny_model, None, ids, 8)
    assert outputs["a"] == torch_generate(tiny_model, adapter_dirs["a"], ids, 8)
    assert outputs["b"] == torch_generate(tiny_model, adapter_dirs["b"], ids, 8)


def test_separate_int4_keeps_lora_unquantized(client, trained, tmp_path):
    import onnx

    job = run_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": trained.jobs["b"]}]},
        precision="int4",
        adapter_mode="separate",
        quantization={"block_size": 32},
        gate={"prompts": ["i feel so happy today ->", "i am angry about ->"], "max_new_tokens": 12},
    )
    assert job["status"] == "succeeded", job["error"]
    manifest = job["result"]
    assert manifest["quantization"] == {
        "method": "k_quant",
        "int8_sensitive_layers": True,
        "block_size": 32,
        "accuracy_level": None,
    }
    assert manifest["gate"]["prompt_source"] == "request" and manifest["gate"]["prompts"] == 2
    assert manifest["adapters"][0]["file"] is None and manifest["files"] == {"manifest.json": job["result_files"][1]}
    package = untar(download(client, trained.auth, job["result_files"][0]).content, tmp_path / "p")
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    assert ops["/model/layers.0/attn/q_proj/lora_A/MatMul"] == "MatMul"  # LoRA: float MatMuls
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
    }
    # Base weights quantized: the sensitive projections (int8_sensitive_layers) in int8, the others in int4.
    layer = "/model/layers.0"
    assert bits[f"{layer}/mlp/down_proj/MatMul_Q8"] == bits[f"{layer}/attn/v_proj/MatMul_Q8"] == 8
    assert bits[f"{layer}/mlp/up_proj/MatMul_Q4"] == bits["/lm_head/MatMul_Q4"] == 4


def test_merged_int8_from_a_checkpoint(client, trained):
    checkpoint = trained.checkpoints["a@3"]
    job = run_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": trained.jobs["a"], "checkpoint": checkpoint}]},
        precision="int8",
    )
    assert job["status"] == "succeeded", job["error"]
    manifest = job["result"]
    assert manifest["adapter_mode"] == "merged" and manifest["adapters"][0]["merged"]
    assert manifest["adapters"][0]["checkpoint_id"] == checkpoint and manifest["adapters"][0]["step"] == 3
    assert manifest["gate"]["checks"][0]["token_match"] >= 0.7


def test_corrupted_export_fails_the_gate_and_publishes_nothing(client, trained, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from worker import onnx_build

    real_build = onnx_build.build

    def build_then_corrupt(input_dir, output_dir, *args, **kwargs):
        result = real_build(input_dir, output_dir, *args, **kwargs)
        # A broken export: layer 0's attention output weights scaled and flipped.
        model = onnx.load(str(output_dir / "model.onnx"))
        for init in model.graph.initializer:
            if init.name.startswith("model.layers.0.attn.o_proj"):
                init.CopyFrom(numpy_helper.from_array(-4 * numpy_helper.to_array(init), init.name))
        (output_dir / "model.onnx.data").unlink()
        onnx.save(model, str(output_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
        return result

    monkeypatch.setattr(onnx_build, "build", build_then_corrupt)
    job = run_export(client, trained.auth, source={"model": "tiny-llama-test"}, precision="fp32")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "parity_gate_failed" and job["error"]["type"] == "system_error"
    assert "base:" in job["error"]["message"] and "match PyTorch" in job["error"]["message"]
    assert job["result_files"] == [] and job["result"] is None and published_files(job["id"]) == 0
    events = client.get(f"/v1/exports/{job['id']}/events?limit=50", headers=trained.auth).json()["data"]
    warning = next(e for e in events if e["event_type"] == "warning")
    assert warning["level"] == "warn"  # OpenAI's enum: info, warn, error
    report = warning["data"]
    assert report["passed"] is False and report["checks"][0]["token_match"] < 1.0


def test_cancel_stops_the_build(client, trained):
    from models.db import session_scope
    from models.job import Job

    job_id = create_export(client, trained.auth, source={"model": "tiny-llama-test"}, precision="fp32").json()["id"]
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(run_in_process(job_id, "export")))
    worker.start()

    def building() -> bool:
        with session_scope() as session:
            return session.get(Job, job_id).step >= 1

    assert wait_for(building, timeout=60)
    started = time.monotonic()
    assert client.post(f"/v1/exports/{job_id}/cancel", headers=trained.auth).json()["status"] == "cancelling"
    worker.join(timeout=60)
    assert not worker.is_alive() and time.monotonic() - started < 15
    job = client.get(f"/v1/exports/{job_id}", headers=trained.auth).json()
    assert job["status"] == "cancelled" and job["result_files"] == [] and published_files(job_id) == 0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("mode", ["merged", "separate", "multi"])
def test_every_precision_and_mode(client, trained, precision, mode):
    adapters = [{"fine_tuning_job": trained.jobs["a"]}]
    if mode == "multi":
        adapters.append({"fine_tuning_job": trained.jobs["b"]})
    job = run_export(client, trained.auth, source={"adapters": adapters}, precision=precision, adapter_mode=mode)
    assert job["status"] == "succeeded", job["error"]
    checks = job["result"]["gate"]["checks"]
    assert all(c["passed"] for c in checks) and np.mean([c["token_match"] for c in checks]) >= 0.5


def _cuda_ready() -> bool:
    try:
        import onnxruntime_genai as og
        import torch

        return bool(og.is_cuda_available()) and torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and onnxruntime-genai built with CUDA")
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_multi_export(client, trained, precision):
    job = run_export(
        client,
        trained.auth,
        source={"adapters": [{"fine_tuning_job": trained.jobs["a"]}, {"fine_tuning_job": trained.jobs["b"]}]},
        precision=precision,
        execution_provider="cuda",
    )
    assert job["queue"] == "export_cuda" and job["status"] == "succeeded", job["error"]
    assert job["result"]["execution_provider"] == "cuda" and job["result"]["gate"]["passed"]

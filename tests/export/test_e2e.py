"""Against the real API and worker processes (PostgreSQL + Redis): a fine-tune that asks for an export.

The fine-tuning job's `export` section makes the worker create a child export job when it succeeds; the
export runs on the same (CPU) worker queue, and its package is downloaded over HTTP and run.
"""

from __future__ import annotations

import time

import httpx

from tests.e2e.helpers import download, sdk, untar, upload_emotion, wait_for


def wait_for_export(stack, key: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{stack.base_url}/v1/exports/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"export {job_id} did not finish; last status {job['status']}")


def test_fine_tune_with_export_section_produces_a_running_package(live, tmp_path):
    import onnxruntime_genai as og

    key = live.new_key()
    client = sdk(live.base_url, key)
    training = upload_emotion(client, tmp_path, 12)
    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={
            "text_template": "{text} -> {label}",
            "max_steps": 3,
            "learning_rate": 5e-2,
            "adapter": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "export": {"precision": "fp32"},
        },
    )
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, live.log("worker.log"))

    headers = {"Authorization": f"Bearer {key}"}
    children = httpx.get(f"{live.base_url}/v1/exports", params={"parent_id": job.id}, headers=headers).json()["data"]
    assert len(children) == 1 and children[0]["parent_id"] == job.id
    assert children[0]["adapters"][0]["fine_tuning_job"] == job.id and children[0]["adapter_mode"] == "merged"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    assert any(e.data.get("export_job_id") == children[0]["id"] for e in events)

    export = wait_for_export(live, key, children[0]["id"])
    assert export["status"] == "succeeded", (export["error"], live.log("worker.log"))
    assert export["result"]["gate"]["passed"] and export["result"]["adapters"][0]["job_id"] == job.id

    archive_id = export["result_files"][0]
    whole = download(live.base_url, key, archive_id)
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == export["result"]["archive"]["bytes"]
    ranged = download(live.base_url, key, archive_id, Range="bytes=100-199")
    assert ranged.status_code == 206 and ranged.content == whole.content[100:200]

    package = untar(whole.content, tmp_path / "package")
    model = og.Model(str(package))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    ids = tokenizer.encode("i feel so happy today ->")
    params.set_search_options(max_length=len(ids) + 4, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == len(ids) + 4

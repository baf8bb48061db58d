"""The whole cycle on the s3 backend, with an API process and a Celery worker process that share no
storage or work directory: the only way bytes go between them is the bucket of the S3 emulator.

Upload (SDK) -> fine-tune tiny-llama-test, with the automatic evaluation -> download the adapter with the
API key (httpx and curl, whole, ranged, resumed) -> the evaluation's report -> a fine-tune continuing
from the first one's adapter -> delete.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time

import httpx
import pytest
from safetensors.torch import load_file

from tests.conftest import RUN_ID, TMP, Stack
from tests.e2e.helpers import TERMINAL, download, sdk, untar, upload_emotion, wait_for
from tests.storage.conftest import AWS_ENV


@pytest.fixture(scope="module")
def s3_stack(s3_server, database, tiny_model):
    bucket = s3_server.create_bucket()
    root = TMP / "s3-machines"
    shared = AWS_ENV | {
        "GROVE_STORAGE_BACKEND": "s3",
        "GROVE_S3_BUCKET": bucket,
        "GROVE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "GROVE_S3_PREFIX": "grove/",
        "GROVE_FINE_TUNE_QUEUE": f"grove-test-{RUN_ID}-s3",
        "GROVE_RUN_RECONCILER": "true",
        "GROVE_RECONCILE_INTERVAL_SECONDS": "2",
        "GROVE_LEASE_SECONDS": "10",
    }

    def machine(name: str) -> dict[str, str]:
        return {"GROVE_STORAGE_DIR": str(root / name / "storage"), "GROVE_WORK_DIR": str(root / name / "work")}

    stack = Stack("s3", shared | machine("api"))
    stack.start_api()
    stack.env |= machine("worker")
    stack.start_worker()
    stack.wait_ready()
    stack.bucket, stack.root = bucket, root
    yield stack
    stack.stop()


def test_upload_train_download_on_s3(s3_stack, s3_server, tmp_path):
    stack = s3_stack
    key = stack.new_key()
    assert httpx.get(f"{stack.base_url}/readyz").json()["checks"]["storage"] == "ok"
    client = sdk(stack.base_url, key)
    training = upload_emotion(client, tmp_path, 40)
    validation = upload_emotion(client, tmp_path, 12, offset=1000, name="valid.jsonl")

    job = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        validation_file=validation,
        seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={
            "text_template": "{text} -> {label}",
            "max_steps": 12,
            "learning_rate": 5e-3,
            "adapter": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "evaluation": {"metrics": ["loss"]},
        },
    )
    job = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, stack.log("worker.log"))

    # Every input and result is an object of the bucket, and neither machine kept a copy in its store.
    objects = s3_server.object_names(stack.bucket)
    for file_id in [training, validation, *job.result_files]:
        assert any(name.startswith("grove/objects/") and name.endswith(f"/{file_id}") for name in objects), file_id
    for machine in ("api", "worker"):
        store = stack.root / machine / "storage"
        assert not (store / "objects").exists() and list((store / "tmp").glob("*")) == [], machine

    adapter_id = job.result_files[0]
    adapter_file = client.files.retrieve(adapter_id)
    response = download(stack.base_url, key, adapter_id)
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content) == adapter_file.bytes
    assert response.headers["etag"] == f'"{hashlib.sha256(response.content).hexdigest()}"'
    assert response.headers["content-disposition"] == f'attachment; filename="{adapter_file.filename}"'
    ranged = download(stack.base_url, key, adapter_id, Range="bytes=100-199")
    assert ranged.status_code == 206 and ranged.content == response.content[100:200]
    assert ranged.headers["content-range"] == f"bytes 100-199/{adapter_file.bytes}"

    adapter_dir = untar(response.content, tmp_path / "adapter")
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [value for name, value in saved.items() if "lora_B" in name]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)  # trained away from zero

    if shutil.which("curl"):
        # The README's download, then a resumed one (curl -C - sends Range: bytes=<size>-).
        url, auth = f"{stack.base_url}/v1/files/{adapter_id}/content", f"Authorization: Bearer {key}"
        whole, resumed = tmp_path / "curl.tar", tmp_path / "resumed.tar"
        subprocess.run(["curl", "-sSf", "-H", auth, "-o", str(whole), url], check=True)
        assert whole.read_bytes() == response.content
        resumed.write_bytes(response.content[:1000])
        subprocess.run(["curl", "-sSf", "-C", "-", "-H", auth, "-o", str(resumed), url], check=True)
        assert resumed.read_bytes() == response.content

    # The automatic evaluation ran on the worker from the bucket's copies; its report comes from the bucket.
    headers = {"Authorization": f"Bearer {key}"}
    [child] = httpx.get(f"{stack.base_url}/v1/evaluations?parent_id={job.id}", headers=headers).json()["data"]
    deadline = time.monotonic() + 240
    while child["status"] not in TERMINAL:
        assert time.monotonic() < deadline, child
        time.sleep(0.3)
        child = httpx.get(f"{stack.base_url}/v1/evaluations/{child['id']}", headers=headers).json()
    assert child["status"] == "succeeded", (child["error"], stack.log("worker.log"))
    report = httpx.get(f"{stack.base_url}/v1/evaluations/{child['id']}/report", headers=headers)
    assert report.status_code == 200 and report.headers["content-type"] == "application/json"
    assert set(report.json()["summary"]) == {"tiny-llama-test", job.id}

    # Continuing from the job: the worker fetches the published adapter from the bucket.
    continued = client.fine_tuning.jobs.create(
        model="tiny-llama-test",
        training_file=training,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"text_template": "{text} -> {label}", "max_steps": 2, "from_job": job.id},
    )
    continued = wait_for(client, continued.id)
    assert continued.status == "succeeded", (continued.error, stack.log("worker.log"))
    assert continued.model_extra["from_job"] == job.id
    again = download(stack.base_url, key, continued.result_files[0])
    assert again.status_code == 200 and again.content != response.content

    client.files.delete(training)
    assert not any(name.endswith(f"/{training}") for name in s3_server.object_names(stack.bucket))

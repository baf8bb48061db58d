"""The artifact store fills up during publish: the job fails with a clear error, no temp file stays,
and the same worker goes on to the next job."""

from __future__ import annotations

import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.chaos.test_faults import SPEC, client_for, dataset, upload, wait_all
from tests.conftest import Stack, new_key


@pytest.fixture
def small_disk():
    mount_point = Path(tempfile.mkdtemp(prefix="grove-small-disk-"))
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_storage_full_during_publish(small_disk, private_redis, tiny_model):
    stack = Stack(
        f"diskfull-{uuid.uuid4().hex[:6]}",
        {
            "GROVE_BROKER_URL": private_redis.url,
            "GROVE_FINE_TUNE_QUEUE": "diskfull",
            "GROVE_STORAGE_DIR": str(small_disk),
        },
    ).start()
    try:
        with client_for(stack, new_key()) as http:
            file_id = upload(http, dataset(10)).json()["id"]
            body = SPEC | {"training_file": file_id, "max_steps": 2}
            first = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
            job = wait_all(http, [first], timeout=120)[first]
            # The adapter archive (with its tokenizer, ~3.5 MB) cannot fit in 1 MB.
            assert job["status"] == "failed"
            assert job["error"]["code"] == "storage_full" and job["error"]["type"] == "system_error"
            assert job["result_files"] == []
            assert list((small_disk / "tmp").iterdir()) == []
            # Nothing half-published is listed: besides the upload, only the job's checkpoint archives (small
            # enough to fit before the disk filled), each downloadable in full.
            listed = http.get("/v1/files?limit=100").json()["data"]
            checkpoints = http.get(f"/v1/fine_tuning/jobs/{first}/checkpoints").json()["data"]
            assert sorted(f["id"] for f in listed) == sorted([file_id] + [c["file_id"] for c in checkpoints])
            for listed_file in listed:
                content = http.get(f"/v1/files/{listed_file['id']}/content")
                assert content.status_code == 200 and len(content.content) == listed_file["bytes"]

            worker_pid = stack.worker.pid
            subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
            second = http.post("/v1/fine_tuning/jobs", json=body).json()["id"]
            assert wait_all(http, [second], timeout=120)[second]["status"] == "succeeded"
            assert stack.worker.pid == worker_pid and stack.worker.poll() is None
    finally:
        stack.stop()

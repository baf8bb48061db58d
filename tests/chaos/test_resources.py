"""Resources run out: the artifact store fills up during publish, or the kernel kills the worker for memory.
The job fails with a clear error, no temp file stays, and the same worker goes on to the next job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.chaos.test_faults import SPEC, client_for, dataset, event_types, upload, wait_all
from tests.conftest import Stack


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
        with client_for(stack, stack.new_key()) as http:
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


class MemoryCgroup:
    """A cgroup with a 1.5 GiB memory limit: the kernel OOM-kills what grows past it.

    On the unified hierarchy (cgroup v2: `memory` in /sys/fs/cgroup/cgroup.controllers) it is a child of the root,
    limited by `memory.max` with no swap; where the memory controller is still mounted on its own (v1, or a hybrid
    machine like this CI machine) it is a child there, limited by `memory.limit_in_bytes`.
    """

    LIMIT = 1536 * 1024 * 1024

    def __init__(self) -> None:
        name = f"grove-test-{uuid.uuid4().hex[:8]}"
        unified = Path("/sys/fs/cgroup")
        controllers = unified / "cgroup.controllers"
        self.v2 = controllers.exists() and "memory" in controllers.read_text().split()
        if self.v2:
            (unified / "cgroup.subtree_control").write_text("+memory")
            self.path = unified / name
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(self.LIMIT))
            with contextlib.suppress(OSError):  # no swap accounting on this kernel: nothing to turn off
                (self.path / "memory.swap.max").write_text("0")
        else:
            self.path = Path("/sys/fs/cgroup/memory") / name
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(self.LIMIT))

    def times_limit_hit(self) -> int:
        """How often the limit was reached (v1 `memory.failcnt`; v2 the `max` and `oom_kill` events)."""
        if not self.v2:
            return int((self.path / "memory.failcnt").read_text())
        events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
        return int(events["max"]) + int(events["oom_kill"])

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def memory_cgroup():
    try:
        cgroup = MemoryCgroup()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup (v1 or v2) here: {exc}")
    yield cgroup
    cgroup.remove()


def move_process_group(pgid: int, cgroup: MemoryCgroup) -> None:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # the fields after the command: state, ppid, pgrp, ...
                (cgroup.path / "cgroup.procs").write_text(stat.parent.name)


def long_rows(n: int) -> bytes:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(1500)), "label": "joy"} for i in range(n)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_worker_killed_for_memory_fails_the_job_and_takes_the_next(memory_cgroup, private_redis, tiny_model):
    """The worker runs out of memory on every attempt: after `max_attempts` OOM kills the job fails with
    `worker_lost` instead of looping (or at once with `out_of_memory` where an allocation is refused), its scratch
    directory goes, and the worker runs the next job."""
    work_dir = Path(tempfile.mkdtemp(prefix="grove-oom-work-"))
    stack = Stack(
        f"oom-{uuid.uuid4().hex[:6]}",
        {
            "GROVE_BROKER_URL": private_redis.url,
            "GROVE_FINE_TUNE_QUEUE": "oom",
            "GROVE_WORK_DIR": str(work_dir),
            "GROVE_LEASE_SECONDS": "4",
            "GROVE_RUN_RECONCILER": "true",
            "GROVE_RECONCILE_INTERVAL_SECONDS": "1",
            # The attempts limit the assertions below count on; a queued job that no worker claimed is sent
            # again within seconds.
            "GROVE_MAX_ATTEMPTS": "3",
            "GROVE_REDISPATCH_AFTER_SECONDS": "5",
        },
    ).start()
    try:
        time.sleep(3)  # the pool process is forked before it is moved with its parent
        move_process_group(stack.worker.pid, memory_cgroup)
        with client_for(stack, stack.new_key()) as http:
            heavy_file = upload(http, long_rows(16)).json()["id"]
            # 16 rows of ~2,000 tokens in one micro-batch need more than the 1.5 GiB limit (failcnt below proves it).
            heavy = SPEC | {"training_file": heavy_file, "max_steps": 2, "max_seq_len": 2048}
            heavy |= {"hyperparameters": {"batch_size": 16}, "gradient_accumulation_steps": 1}
            created = http.post("/v1/fine_tuning/jobs", json=heavy)
            assert created.status_code == 200, created.text
            first = created.json()["id"]
            job = wait_all(http, [first], timeout=300)[first]
            assert job["status"] == "failed", job
            # Two honest outcomes: the kernel kills the pool process (each attempt, until the reconciler gives up),
            # or the limit refuses an allocation inside a call (a syscall's kernel memory, a C++ kernel's
            # buffer) and the stage fails at once. Anything else is a misclassified failure.
            worker_log = (stack.logs / "worker.log").read_text(errors="replace")[-6000:]
            assert job["error"]["type"] == "system_error", (job["error"], worker_log)
            assert job["error"]["code"] in {"worker_lost", "out_of_memory"}, (job["error"], worker_log)
            assert "memory" in job["error"]["message"]
            expected_starts = 3 if job["error"]["code"] == "worker_lost" else 1
            assert event_types(http, first).count("started") == expected_starts
            assert memory_cgroup.times_limit_hit() > 0

            small_file = upload(http, dataset(10)).json()["id"]
            second = http.post("/v1/fine_tuning/jobs", json=SPEC | {"training_file": small_file, "max_steps": 2})
            assert wait_all(http, [second.json()["id"]], timeout=120)[second.json()["id"]]["status"] == "succeeded"
            assert stack.worker.poll() is None
            assert not (work_dir / first).exists()  # the next job's worker removed the dead job's scratch
    finally:
        stack.stop()
        shutil.rmtree(work_dir, ignore_errors=True)

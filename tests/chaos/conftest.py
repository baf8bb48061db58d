"""Chaos tests: real processes killed at bad moments. `make chaos` runs them at full scale
(GROVE_CHAOS_FULL=1); CI runs the same scenarios at a small scale."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest
import redis

from tests.conftest import Stack, free_port

FULL = os.environ.get("GROVE_CHAOS_FULL") == "1"


def scale(ci: int, full: int) -> int:
    return full if FULL else ci


class PrivateRedis:
    """A Redis of the test's own, so that stopping and flushing it touches nobody else."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis():
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def chaos_stack(private_redis, tiny_model):
    stack = Stack(
        f"chaos-{uuid.uuid4().hex[:6]}",
        {
            "GROVE_BROKER_URL": private_redis.url,
            "GROVE_FINE_TUNE_QUEUE": f"chaos-{uuid.uuid4().hex[:6]}",
            "GROVE_RUN_RECONCILER": "true",
            "GROVE_RECONCILE_INTERVAL_SECONDS": "1",
            "GROVE_LEASE_SECONDS": "4",
            "GROVE_REDISPATCH_AFTER_SECONDS": "5",
            # Its own store: an API killed mid-upload leaves a staged temp file that other tests must not see.
            "GROVE_STORAGE_DIR": tempfile.mkdtemp(prefix="grove-chaos-storage-"),
        },
    )
    yield stack
    stack.stop()

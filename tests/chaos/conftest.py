"""Chaos tests: real processes killed at bad moments. `make chaos` runs them at full scale
(GROVE_CHAOS_FULL=1); CI runs the same scenarios at a small scale."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import Stack
from tests.servers import RedisServer

FULL = os.environ.get("GROVE_CHAOS_FULL") == "1"


def scale(ci: int, full: int) -> int:
    return full if FULL else ci


def pytest_collection_modifyitems(config, items):
    if not FULL:
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(3600))  # full scale runs past the suite's per-test limit


@pytest.fixture
def private_redis():
    """A Redis of the test's own, so that stopping and flushing it touches nobody else."""
    server = RedisServer(prefix="grove-chaos-redis-").start()
    yield server
    server.destroy()


@pytest.fixture
def chaos_stack(private_redis, tiny_model):
    """A stack on a Redis of its own and, as every Stack, a database and store of its own: the temp file an API
    killed mid-upload leaves, and a reconciler that requeues within seconds, touch no other test."""
    stack = Stack(
        f"chaos-{uuid.uuid4().hex[:6]}",
        {
            "GROVE_BROKER_URL": private_redis.url,
            "GROVE_FINE_TUNE_QUEUE": f"chaos-{uuid.uuid4().hex[:6]}",
            "GROVE_RUN_RECONCILER": "true",
            "GROVE_RECONCILE_INTERVAL_SECONDS": "1",
            "GROVE_LEASE_SECONDS": "4",
            "GROVE_REDISPATCH_AFTER_SECONDS": "5",
        },
    )
    yield stack
    stack.stop()

"""Fixtures for worker tests: a model store with the tiny test model prepared in it, a queued job, its queue."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import redis

import tests.conftest
from models.config import get_settings
from tests.api.test_files import jsonl, upload
from tests.conftest import prompt_completion_rows
from worker.prepare_models import ensure_model

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m", default="") or ""
    if "slow" in markexpr or os.environ.get("GROVE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow or GROVE_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_store() -> Path:
    env = os.environ.get("GROVE_MODEL_STORE_DIR")
    return Path(env) if env else REPO / "var" / "models"


@pytest.fixture(scope="session")
def tiny_model_dir(model_store: Path) -> Path:
    return ensure_model(model_store, "tiny-llama-test")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture
def queue():
    """A fine-tuning queue of the test's own: only its jobs are published there, so counts are its own."""
    client = redis.Redis.from_url(tests.conftest.REDIS_URL)  # read now: set once the session has begun
    name = f"grove-test-dispatch-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GROVE_FINE_TUNE_QUEUE", name)
        get_settings.cache_clear()
        yield lambda: client.llen(name)
    get_settings.cache_clear()
    client.delete(name)


@pytest.fixture
def job_id(queue, client, auth) -> str:
    file_id = upload(client, auth, jsonl(prompt_completion_rows(10))).json()["id"]
    response = client.post(
        "/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test", "training_file": file_id}
    )
    return response.json()["id"]

"""Fixtures for worker tests: a model store with the tiny test model prepared in it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.prepare_models import ensure_model

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: builds or trains the 135M smollm2 model; opt in with -m slow or GROVE_SLOW_TESTS=1"
    )


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

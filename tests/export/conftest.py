"""Fixtures for export tests: small tiny-llama-test adapters trained here, by the real fine-tuning stage.

One project holds four succeeded fine-tuning jobs, trained in-process (the Celery task function called
directly, as a worker would):
- a, b: rank 8 on q_proj/v_proj, different data and seeds (a saves checkpoints at steps 3 and 6);
- rank4: rank 4 on q_proj/v_proj (a rank mismatch against a and b);
- qkv: rank 8 on q_proj/k_proj/v_proj (a target-module mismatch).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.api.test_files import jsonl, upload
from tests.conftest import emotion_rows, new_key
from worker.archives import unpack_tar

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m", default="") or ""
    if "slow" in markexpr or os.environ.get("GROVE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with -m slow or GROVE_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords and HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@dataclass
class Trained:
    key: str
    auth: dict
    jobs: dict[str, str]  # label -> fine-tuning job id
    checkpoints: dict[str, str]  # "a@3" -> checkpoint id


def run_in_process(job_id: str, kind: str) -> str:
    from worker.tasks import run_job

    return run_job(job_id, kind)


@pytest.fixture(scope="session")
def trained(app) -> Trained:
    from models.db import session_scope
    from models.job import Checkpoint

    key = new_key(f"export-{uuid.uuid4().hex[:8]}")
    auth = {"Authorization": f"Bearer {key}"}
    recipes = {
        "a": ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, 0, 6, 1),
        "b": ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, 200, 3, 2),
        "rank4": ({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, 400, 1, 3),
        "qkv": ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}, 600, 1, 4),
    }
    jobs: dict[str, str] = {}
    with TestClient(app) as client:
        for label, (adapter, offset, steps, seed) in recipes.items():
            file_id = upload(client, auth, jsonl(emotion_rows(12, offset))).json()["id"]
            response = client.post(
                "/v1/fine_tuning/jobs",
                headers=auth,
                json={
                    "model": "tiny-llama-test",
                    "training_file": file_id,
                    "validation_file": file_id,
                    "text_template": "{text} -> {label}",
                    "suffix": label,
                    "seed": seed,
                    "hyperparameters": {"batch_size": 4},
                    "max_steps": steps,
                    "learning_rate": 5e-2,
                    "adapter": adapter,
                },
            )
            assert response.status_code == 200, response.text
            jobs[label] = response.json()["id"]
            assert run_in_process(jobs[label], "fine_tune") == "done"
            job = client.get(f"/v1/fine_tuning/jobs/{jobs[label]}", headers=auth).json()
            assert job["status"] == "succeeded", job["error"]
    with session_scope() as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == jobs["a"])).all()
        checkpoints = {f"a@{c.step}": c.id for c in rows}
    return Trained(key=key, auth=auth, jobs=jobs, checkpoints=checkpoints)


def create_export(client, auth, **body):
    return client.post("/v1/exports", headers=auth, json=body)


def untar(content: bytes, destination: Path) -> Path:
    archive = destination.with_name(destination.name + ".tar")
    archive.write_bytes(content)
    return unpack_tar(archive, destination)

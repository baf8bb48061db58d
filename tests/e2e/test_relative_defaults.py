"""`make run`'s own configuration, end to end: every path left at its relative default (SQLite database and broker
under var/, store, scratch and model store under var/), the processes started in a directory of their own.

A fine-tune, then its export as a multi-adapter package and as a separate-adapter model. The model builder runs in
the export's scratch directory, so a relative path reaching it (the adapter's recorded base model) does not resolve
there, and the builder falls back to the model hub (issue 17). Settings resolve every path once, at start-up.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import uuid
from pathlib import Path

import httpx
import pytest

from models.config import Settings
from tests.chaos.test_faults import SPEC, dataset, upload, wait_all
from tests.conftest import REPO, Stack, alembic
from tests.export.test_e2e import wait_for_export

# The defaults as declared, before any validator: what a user who sets nothing gets.
RELATIVE_DEFAULTS = {
    "GROVE_DATABASE_URL": Settings.model_fields["database_url"].default,
    "GROVE_BROKER_URL": Settings.model_fields["broker_url"].default,
    "GROVE_STORAGE_DIR": str(Settings.model_fields["storage_dir"].default),
    "GROVE_WORK_DIR": str(Settings.model_fields["work_dir"].default),
    "GROVE_MODEL_STORE_DIR": str(Settings.model_fields["model_store_dir"].default),
}


@pytest.fixture
def relative_stack(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("relative-defaults")
    assert all(not Path(v.split("///")[-1]).is_absolute() for v in RELATIVE_DEFAULTS.values()), RELATIVE_DEFAULTS
    # A copy: the model store refuses a symlinked model directory.
    shutil.copytree(tiny_model, home / "var" / "models" / tiny_model.name)
    alembic("upgrade", "head", url=f"sqlite:///{home}/{RELATIVE_DEFAULTS['GROVE_DATABASE_URL'].split('///')[1]}")
    env = RELATIVE_DEFAULTS | {"GROVE_FINE_TUNE_QUEUE": "fine_tune", "GROVE_RUN_RECONCILER": "true"}
    stack = Stack(f"relative-{uuid.uuid4().hex[:6]}", env, cwd=home)
    stack.key = stack.grove("bootstrap", "--key-file", "var/api-key")
    stack.start()
    yield stack, home
    stack.stop()


def test_multi_and_separate_exports_under_the_relative_defaults(relative_stack, tmp_path):
    stack, home = relative_stack
    assert stack.cwd != REPO
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=60) as http:
        file_id = upload(http, dataset(12)).json()["id"]
        body = SPEC | {"training_file": file_id, "max_steps": 2, "adapter": {"r": 4, "target_modules": ["q_proj"]}}
        created = http.post("/v1/fine_tuning/jobs", json=body)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        job = wait_all(http, [job_id], timeout=180)[job_id]
        assert job["status"] == "succeeded", (job["error"], stack.log("worker.log"))

        # Everything the service wrote is under the directory it started in, by the relative defaults.
        assert (home / "var" / "grove.db").is_file() and (home / "var" / "broker.sqlite").is_file()
        assert any((home / "var" / "storage").rglob("*")), "nothing stored under var/storage"
        adapter = http.get(f"/v1/files/{job['result_files'][0]}/content")
        (tmp_path / "adapter.tar").write_bytes(adapter.content)
        with tarfile.open(tmp_path / "adapter.tar") as tar:
            recorded = json.load(tar.extractfile("adapter_config.json"))["base_model_name_or_path"]
        assert Path(recorded).is_absolute() and (Path(recorded) / "config.json").is_file(), recorded

        for mode in ("multi", "separate"):
            created = http.post(
                "/v1/exports",
                json={"source": {"adapters": [{"fine_tuning_job": job_id}]}, "precision": "fp32", "adapter_mode": mode},
            )
            assert created.status_code == 200, created.text
            export = wait_for_export(stack, stack.key, created.json()["id"], timeout=300)
            assert export["status"] == "succeeded", (mode, export["error"], stack.log("worker.log"))
            assert export["result"]["adapter_mode"] == mode and export["result"]["gate"]["passed"]

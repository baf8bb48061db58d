"""Fixtures for evaluation tests: an ONNX package of tiny-llama-test laid out as export jobs publish them."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import TMP


def build_package(model_dir: Path, out: Path, precision: str = "fp32") -> Path:
    """The onnxruntime-genai model builder's output plus a manifest.json: the export-job package contract."""
    if not (out / "genai_config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
             "-p", precision, "-e", "cpu"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        manifest = {"format": "grove.onnx-package", "version": 1, "base_model": {"name": model_dir.name},
                    "precision": precision, "adapters": []}  # fmt: skip
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def pack(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return archive


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model) -> Path:
    return build_package(tiny_model, TMP / "tiny-onnx-fp32")


class Tenant:
    """A project with its key, and an in-process API client: shared by the tests of one module."""

    def __init__(self, client, name: str):
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            project = get_or_create_project(session, name)
            self.project_id = project.id
            self.headers = {"Authorization": f"Bearer {create_key(session, project)}"}
        self.client = client

    def upload(self, rows: list, name: str = "data.jsonl") -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows)
        response = self.client.post(
            "/v1/files", headers=self.headers, files={"file": (name, body)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def post(self, path: str, body: dict):
        return self.client.post(path, headers=self.headers, json=body)

    def get(self, path: str):
        return self.client.get(path, headers=self.headers)

    def export_job(self, package: Path, adapters: list | None = None, archive: Path | None = None) -> str:
        """A succeeded export job holding `package` (or an archive as given), as export jobs publish them."""
        from models.db import session_scope
        from models.ids import new_id
        from models.job import Job
        from models.job_status import JobStatus
        from models.results import publish_file

        archive = archive or pack(package, package.parent / f"{package.name}-{new_id('x')}.tar")
        with session_scope() as session:
            job = Job(id=new_id("exportjob"), project_id=self.project_id, kind="export", queue="none",
                      model="tiny-llama-test", spec={}, status=JobStatus.succeeded)  # fmt: skip
            session.add(job)
            session.flush()
            file = publish_file(session, self.project_id, archive, f"{job.id}-onnx.tar", "export-results", job.id)
            job.result_files = [file.id]
            job.result = {"format": "grove.onnx-package", "base_model": {"name": "tiny-llama-test"},
                          "adapters": adapters or []}  # fmt: skip
            return job.id


@pytest.fixture(scope="module")
def tenant(app):
    import uuid

    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield Tenant(client, f"eval-{uuid.uuid4().hex[:8]}")

"""Fixtures for sweep tests: a project with tiny training and validation files, and sweep request bodies."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.conftest import emotion_rows

TEMPLATE = "{text} -> {label}"


class SweepTenant:
    """A project with its key, an in-process API client, and the emotion files uploaded once."""

    def __init__(self, client):
        from api.services.keys import create_key, get_or_create_project
        from models.db import session_scope

        with session_scope() as session:
            project = get_or_create_project(session, f"sweep-{uuid.uuid4().hex[:8]}")
            self.project_id = project.id
            self.key = create_key(session, project)
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.client = client
        self.training = self.upload(emotion_rows(24), "train.jsonl")
        self.validation = self.upload(emotion_rows(10, offset=24), "valid.jsonl")

    def upload(self, rows: list, name: str) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows)
        response = self.client.post(
            "/v1/files", headers=self.headers, files={"file": (name, body)}, data={"purpose": "fine-tune"}
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def base(self, **overrides) -> dict:
        return {
            "model": "tiny-llama-test",
            "training_file": self.training,
            "validation_file": self.validation,
            "text_template": TEMPLATE,
            "max_steps": 2,
            "hyperparameters": {"batch_size": 4},
            "max_seq_len": 64,
        } | overrides

    def sweep_body(self, search_space: dict, **fields) -> dict:
        return {"fine_tuning": self.base(**fields.pop("fine_tuning", {})), "search_space": search_space} | fields

    def post(self, path: str, body: dict):
        return self.client.post(path, headers=self.headers, json=body)

    def get(self, path: str):
        return self.client.get(path, headers=self.headers)

    def create(self, search_space: dict, **fields) -> dict:
        response = self.post("/v1/sweeps", self.sweep_body(search_space, **fields))
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def tenant(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield SweepTenant(client)

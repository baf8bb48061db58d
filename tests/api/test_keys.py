"""API keys: stored as their sha256 only, found by that hash, revocable, scoped to a project; admin keys
manage keys over /v1/admin/keys (created with `grove keys create --admin`) and reach nothing else."""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import select, text
from typer.testing import CliRunner

from api.cli import app as cli
from models.db import session_scope
from models.project import ApiKey
from tests.conftest import new_key

runner = CliRunner()


def admin_key() -> str:
    result = runner.invoke(cli, ["keys", "create", "--admin"])
    assert result.exit_code == 0, result.output
    return result.output.strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_stored_as_their_sha256_only(client):
    key = new_key()
    digest = hashlib.sha256(key.encode()).hexdigest()
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        assert row is not None and row.hint == key[:10] and row.scope == "project"
        # No column of any key row holds the key itself.
        dump = session.execute(text("SELECT * FROM api_keys")).all()
    assert not any(key in str(value) for line in dump for value in line)
    assert client.get("/v1/files", headers=bearer(key)).status_code == 200
    # A key one character off is a different hash: 401, not a near match.
    assert client.get("/v1/files", headers=bearer(key[:-1] + ("A" if key[-1] != "A" else "B"))).status_code == 401


def test_admin_creates_lists_and_revokes_keys_over_http(client):
    admin = bearer(admin_key())
    project = f"http-{uuid.uuid4().hex[:8]}"
    created = client.post("/v1/admin/keys", headers=admin, json={"project": project})
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["object"] == "api_key" and body["scope"] == "project" and body["project"] == project
    assert body["key"].startswith("grove-") and body["hint"] == body["key"][:10] and body["revoked_at"] is None
    key = body["key"]
    assert client.get("/v1/files", headers=bearer(key)).status_code == 200

    # Listed (never with the key itself), by project, and one by one.
    listed = client.get(f"/v1/admin/keys?project={project}", headers=admin).json()
    assert [k["id"] for k in listed["data"]] == [body["id"]] and "key" not in listed["data"][0]
    assert key not in client.get("/v1/admin/keys?limit=1000", headers=admin).text
    assert client.get(f"/v1/admin/keys/{body['id']}", headers=admin).json()["project_id"] == body["project_id"]

    # A second key of the same project sees the same objects.
    second = client.post("/v1/admin/keys", headers=admin, json={"project": project}).json()
    file_id = client.post(
        "/v1/files", headers=bearer(key), files={"file": ("a.jsonl", b'{"prompt":"a","completion":"b"}\n' * 10)},
        data={"purpose": "fine-tune"},
    ).json()["id"]  # fmt: skip
    assert client.get(f"/v1/files/{file_id}", headers=bearer(second["key"])).status_code == 200

    # Revoked: the next request gets 401; revoking again changes nothing; the other key still works.
    revoked = client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    response = client.get("/v1/files", headers=bearer(key))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    again = client.post(f"/v1/admin/keys/{body['id']}/revoke", headers=admin).json()
    assert again["revoked_at"] == revoked.json()["revoked_at"]
    assert client.get("/v1/files", headers=bearer(second["key"])).status_code == 200
    assert client.get("/v1/admin/keys/key-nope", headers=admin).status_code == 404


def test_admin_keys_over_http_and_their_refusals(client):
    admin = bearer(admin_key())
    made = client.post("/v1/admin/keys", headers=admin, json={"scope": "admin"}).json()
    assert made["scope"] == "admin" and made["project_id"] is None
    # The new admin key manages keys; it revokes the first one, which then gets 401 everywhere.
    first_id = client.get("/v1/admin/keys?scope=admin&limit=1", headers=bearer(made["key"])).json()["data"][0]["id"]
    assert first_id == made["id"]
    for body, param in (({"scope": "admin", "project": "x"}, "project"), ({}, "project"), ({"scope": "root"}, "scope")):
        response = client.post("/v1/admin/keys", headers=admin, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # Admin keys reach no project; project keys manage no keys (every route: tests/api/test_tenancy.py).
    response = client.get("/v1/files", headers=admin)
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    response = client.get("/v1/admin/keys", headers=bearer(new_key()))
    assert response.status_code == 403 and "admin key" in response.json()["error"]["message"]


def test_cli_creates_lists_and_revokes_keys(client):
    key = admin_key()
    assert client.get("/v1/admin/keys", headers=bearer(key)).status_code == 200
    project = f"cli-{uuid.uuid4().hex[:8]}"
    project_key = runner.invoke(cli, ["keys", "create", "--project", project]).output.strip()
    listed = runner.invoke(cli, ["keys", "list", "--project", project])
    assert listed.exit_code == 0 and project in listed.output and project_key not in listed.output
    key_id = listed.output.split()[0]
    assert runner.invoke(cli, ["keys", "revoke", key_id]).exit_code == 0
    assert client.get("/v1/files", headers=bearer(project_key)).status_code == 401
    # One of --project and --admin, not both, not neither.
    assert runner.invoke(cli, ["keys", "create"]).exit_code != 0
    assert runner.invoke(cli, ["keys", "create", "--admin", "--project", "x"]).exit_code != 0
    assert runner.invoke(cli, ["keys", "revoke", "key-nope"]).exit_code != 0


def test_the_database_refuses_an_admin_key_with_a_project_and_a_project_key_without_one():
    import pytest
    from sqlalchemy.exc import IntegrityError

    from api.services.keys import get_or_create_project

    for scope, with_project in (("admin", True), ("project", False)):
        with pytest.raises(IntegrityError), session_scope() as session:
            project = get_or_create_project(session, f"ck-{uuid.uuid4().hex[:8]}") if with_project else None
            session.add(ApiKey(project_id=project.id if project else None, scope=scope, key_hash=uuid.uuid4().hex,
                               hint="x"))  # fmt: skip
            session.flush()

"""Issue 16, /metrics: it shows every project's job counts and the workers' host names. With
GROVE_METRICS_REQUIRE_ADMIN on, only an admin key reads it; off (the embedded default), it stays open."""

from __future__ import annotations

import pytest

from models.config import get_settings


@pytest.fixture
def keys(database) -> dict[str, dict[str, str]]:
    from api.services.keys import create_admin_key, issue, revoke
    from models.db import session_scope
    from tests.conftest import new_key

    with session_scope() as session:
        admin = create_admin_key(session)
        row, revoked = issue(session, None)
        revoke(session, row.id)
    bearer = {name: f"Bearer {key}" for name, key in (("admin", admin), ("revoked_admin", revoked))}
    bearer["project"] = f"Bearer {new_key()}"
    bearer["garbage"] = "Bearer not-a-key"
    return {name: {"Authorization": value} for name, value in bearer.items()} | {"none": {}}


@pytest.mark.parametrize(
    ("caller", "status"),
    [("none", 401), ("garbage", 401), ("revoked_admin", 401), ("project", 403), ("admin", 200)],
)
def test_metrics_need_an_admin_key_when_required(client, keys, monkeypatch, caller, status):
    monkeypatch.setattr(get_settings(), "metrics_require_admin", True)
    response = client.get("/metrics", headers=keys[caller])
    assert response.status_code == status, response.text
    if status == 200:
        assert "grove_jobs" in response.text
    else:
        assert "grove_jobs" not in response.text and response.json()["error"]["param"] is None


@pytest.mark.parametrize("caller", ["none", "project", "admin"])
def test_metrics_stay_open_by_default(client, keys, monkeypatch, caller):
    from models.config import Settings

    assert Settings.model_fields["metrics_require_admin"].default is False
    monkeypatch.setattr(get_settings(), "metrics_require_admin", False)
    response = client.get("/metrics", headers=keys[caller])
    assert response.status_code == 200 and "grove_jobs" in response.text

"""Every route that takes a key, called with a revoked key of each scope: 401 `invalid_api_key`, and nothing
stored. The route list comes from the app (tests/api/test_tenancy.py's `app_routes`), so a new route is
covered without an edit here. The calls come from an address of their own, so the failed-authentication
counter they fill is theirs alone."""

from __future__ import annotations

import random
import uuid

import pytest
from sqlalchemy import func, select

from tests.api.test_tenancy import app_routes


def _revoked(scope: str) -> str:
    from api.services.keys import get_or_create_project, issue, revoke
    from models.db import session_scope

    with session_scope() as session:
        project = None if scope == "admin" else get_or_create_project(session, f"revoked-{uuid.uuid4().hex[:8]}")
        row, key = issue(session, project)
        revoke(session, row.id)
    return key


def _counts() -> dict[str, int]:
    from models.db import session_scope
    from models.file import File
    from models.job import Job
    from models.webhook import WebhookEndpoint

    with session_scope() as session:
        return {t.__name__: session.scalar(select(func.count()).select_from(t)) for t in (File, Job, WebhookEndpoint)}


@pytest.mark.parametrize("scope", ["project", "admin"])
def test_a_revoked_key_is_401_on_every_route(app, scope):
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {_revoked(scope)}"}
    routes = [r for r in app_routes(app) if r.auth]
    assert len(routes) >= 40, len(routes)  # as of this writing; new routes only add to it
    before = _counts()
    address = (f"198.19.{random.randrange(256)}.{random.randrange(1, 255)}", 40000)
    with TestClient(app, client=address) as client:
        for route in routes:
            path = route.path.format(**{p: "x" for p in route.params})
            body = {"json": {}} if route.body else {}
            response = client.request(route.method, path, headers=headers, **body)
            assert response.status_code == 401, (route.method, path, response.status_code, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key", (route.method, path, response.text)
    assert _counts() == before

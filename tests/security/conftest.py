"""Fixtures for the hostile-request suite: a tenant with uploaded files, and counts of what it has stored.

A refused request must leave nothing behind, so each test compares what the tenant's project holds before
and after the attack.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from tests.sweeps.conftest import SweepTenant


class Tenant(SweepTenant):
    """A project with its key, an in-process API client, and emotion files uploaded once (`training`,
    `validation`)."""

    def post(self, path: str, body: dict | None, headers: dict | None = None):
        return self.client.post(path, headers=self.headers if headers is None else headers, json=body)

    def count(self, table) -> int:
        """Rows of `table` (a mapped class with project_id) that belong to this tenant's project."""
        from models.db import session_scope

        with session_scope() as session:
            return session.scalar(select(func.count()).select_from(table).where(table.project_id == self.project_id))


@pytest.fixture(scope="module")
def tenant(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        yield Tenant(client)


def assert_refused(response, status: int, param: str | None) -> dict:
    """The response is the error envelope with this status and `param`; returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error

"""Issue 16, webhook `/test`: the outbound POST holds no database session, and each key may send only so many.

A test delivery goes to a URL the tenant chose, which may take the whole webhook timeout to answer. The
receiver below looks at the service's connection pools while the POST is in flight: nothing may be checked
out. Past GROVE_WEBHOOK_TEST_RATE_LIMIT the answer is 429 with Retry-After, and nothing is sent.
"""

from __future__ import annotations

import pytest

from models.config import get_settings
from models.db import get_engine, get_read_sessionmaker
from models.webhook import WebhookDelivery, WebhookEndpoint
from tests.api.test_webhooks import receiver
from tests.conftest import new_key
from tests.security.conftest import assert_refused

EVENT = {"event_type": "fine_tuning.job.succeeded"}


def _checked_out() -> dict[str, int]:
    engines = {"main": get_engine(), "read": get_read_sessionmaker().kw["bind"]}
    return {name: engine.pool.checkedout() for name, engine in engines.items()}


def _endpoint(tenant, url: str) -> str:
    body = {"name": "t", "url": url, "event_types": ["fine_tuning.job.succeeded"]}
    response = tenant.post("/v1/webhook_endpoints", body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_the_post_holds_no_database_connection(tenant):
    during: list[dict[str, int]] = []
    with receiver() as r:
        original = r.server.RequestHandlerClass.do_POST

        def do_post(handler):
            during.append(_checked_out())
            original(handler)

        r.server.RequestHandlerClass.do_POST = do_post
        endpoint = _endpoint(tenant, r.url)
        response = tenant.post(f"/v1/webhook_endpoints/{endpoint}/test", EVENT)
    assert response.status_code == 200 and response.json()["status_code"] == 200, response.text
    assert during == [{"main": 0, "read": 0}]


def test_test_deliveries_are_rate_limited_per_key(client, monkeypatch):
    monkeypatch.setattr(get_settings(), "webhook_test_rate_limit", "2/minute")
    first, second = ({"Authorization": f"Bearer {new_key()}"} for _ in range(2))  # fresh keys: fresh counters
    with receiver() as r:
        body = {"name": "t", "url": r.url, "event_types": ["fine_tuning.job.succeeded"]}
        mine, theirs = (
            client.post("/v1/webhook_endpoints", headers=h, json=body).json()["id"] for h in (first, second)
        )
        answers = [client.post(f"/v1/webhook_endpoints/{mine}/test", headers=first, json=EVENT) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429], answers[-1].text
        assert answers[-1].json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
        assert len(r.requests) == 2  # the refused test sent nothing

        other = client.post(f"/v1/webhook_endpoints/{theirs}/test", headers=second, json=EVENT)
        assert other.status_code == 200, other.text  # another key has its own allowance
        assert len(r.requests) == 3


@pytest.mark.parametrize(
    ("attack", "status", "param"),
    [
        ("no key", 401, None),
        ("wrong key", 401, None),
        ("revoked key", 401, None),
        ("another project's endpoint", 404, "webhook_endpoint_id"),
        ("unknown event type", 400, "event_type"),
        ("no body", 400, "body"),
    ],
)
def test_refused_tests_send_and_store_nothing(tenant, attack, status, param):
    from api.services.keys import issue, revoke
    from models.db import session_scope
    from models.project import Project

    with receiver() as r:
        endpoint = _endpoint(tenant, r.url)
        path, headers, body = f"/v1/webhook_endpoints/{endpoint}/test", tenant.headers, EVENT
        if attack == "no key":
            headers = {}
        elif attack == "wrong key":
            headers = {"Authorization": "Bearer grove-not-a-key"}
        elif attack == "revoked key":
            with session_scope() as session:
                row, key = issue(session, session.get(Project, tenant.project_id))
                revoke(session, row.id)
            headers = {"Authorization": f"Bearer {key}"}
        elif attack == "another project's endpoint":
            headers = {"Authorization": f"Bearer {new_key()}"}
        elif attack == "unknown event type":
            body = {"event_type": "fine_tuning.job.exploded"}
        else:
            body = None
        endpoints_before = tenant.count(WebhookEndpoint)
        assert_refused(tenant.post(path, body, headers=headers), status, param)
        assert r.requests == []
    assert tenant.count(WebhookEndpoint) == endpoints_before
    from sqlalchemy import func, select

    with session_scope() as session:
        deliveries = session.scalar(
            select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint)
        )
    assert deliveries == 0

"""Issue 16, SQL parameters in logs: a failed statement's error names the statement, never its values.

The error text is what reaches logs and error reports; the values may be a webhook signing secret. Each row is
an engine the service builds, and a statement that fails after binding a secret.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from models.db import build_engine, build_read_engine, get_engine, session_scope
from models.webhook import WebhookEndpoint


def _sqlite_engine(tmp_path):
    return build_engine(f"sqlite:///{tmp_path}/hidden.db")


ENGINES = [
    pytest.param(lambda _: get_engine(), id="main-postgresql"),
    pytest.param(lambda _: build_read_engine(get_engine().url.render_as_string(hide_password=False)), id="read"),
    pytest.param(_sqlite_engine, id="embedded-sqlite"),
]


@pytest.mark.parametrize("engine_of", ENGINES)
def test_a_failing_statement_hides_its_parameters(database, tmp_path, engine_of):
    secret = f"whsec_{uuid.uuid4().hex}"
    engine = engine_of(tmp_path)
    with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
        connection.execute(text("SELECT :secret FROM no_such_table"), {"secret": secret})
    if engine is not get_engine():
        engine.dispose()
    assert secret not in str(caught.value)
    assert "hide_parameters" in str(caught.value)  # SQLAlchemy's note in place of the values


def test_a_refused_insert_does_not_show_the_signing_secret(database):
    secret = f"whsec_{uuid.uuid4().hex}"
    endpoint = WebhookEndpoint(
        id=f"whep_{uuid.uuid4().hex[:12]}",
        project_id="proj-that-does-not-exist",  # the foreign key refuses the row
        name="x",
        url="https://example.com/hook",
        event_types=["fine_tuning.job.succeeded"],
        signing_secret=secret,
    )
    with pytest.raises(DBAPIError) as caught, session_scope() as session:
        session.add(endpoint)
        session.flush()
    assert secret not in str(caught.value)

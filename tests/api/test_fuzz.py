"""Fuzzing: schemathesis generates requests for every operation of the OpenAPI spec, valid and invalid, and
sends them to a live API server (uvicorn, PostgreSQL, Redis). No response may be a 5xx, and every response
must match the spec (bodies, the error envelope included, and content types).

The project behind the key holds one real object of each kind, and a generated id is swapped for a real one in
part of the cases (decided by the case itself, so runs repeat), so that requests reach past the 404 of an
unknown id. Admin routes are called with an admin key.

Bounded for CI: 8 cases per operation, the same every run; `make fuzz` sets GROVE_FUZZ_MAX_EXAMPLES (1000) and
draws new cases each time.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
import uuid
import zlib

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.conftest import RUN_ID, Stack, emotion_rows

MAX_EXAMPLES = int(os.environ.get("GROVE_FUZZ_MAX_EXAMPLES", "8"))
# The bounded CI run repeats the same cases every time; a longer run (make fuzz) draws new ones.
DERANDOMIZE = "GROVE_FUZZ_MAX_EXAMPLES" not in os.environ
TEMPLATE = "{text} -> {label}"


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook_receiver():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def fuzz_target(database, tiny_model, webhook_receiver):
    """A live API (no worker: jobs stay queued) and a project holding one real object of each kind."""
    import redis

    from api.services.keys import create_admin_key, create_key, get_or_create_project
    from models.job import Checkpoint

    queue = f"grove-test-{RUN_ID}-fuzz"
    stack = Stack(
        "fuzz",
        {
            "GROVE_FINE_TUNE_QUEUE": queue,
            "GROVE_RUN_RECONCILER": "false",
            "GROVE_RUN_WEBHOOK_SENDER": "false",
            "GROVE_WEBHOOK_ALLOW_PUBLIC": "false",  # no DNS lookups of generated host names
            "GROVE_LOG_LEVEL": "WARNING",
            "GROVE_RATE_LIMIT": "off",  # one key sends thousands of requests a minute (tests/security for limits)
        },
    ).start(worker=False)
    with stack.session() as session:
        project = get_or_create_project(session, f"fuzz-{uuid.uuid4().hex[:8]}")
        key = create_key(session, project)
        spare = create_key(session, project)  # the key whose id admin routes get (revoking it harms nothing)
        admin = create_admin_key(session)
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.base_url, headers=auth, timeout=30) as http:

        def upload(rows):
            body = "".join(json.dumps(r) + "\n" for r in rows)
            response = http.post("/v1/files", files={"file": ("d.jsonl", body)}, data={"purpose": "fine-tune"})
            assert response.status_code == 200, response.text
            return response.json()["id"]

        def create(path, body):
            response = http.post(path, json=body)
            assert response.status_code == 200, (path, response.text)
            return response.json()["id"]

        train, valid = upload(emotion_rows(24)), upload(emotion_rows(10, offset=24))
        job = {"model": "tiny-llama-test", "training_file": train, "text_template": TEMPLATE}
        real = {
            "file_id": train,
            "job_id": create("/v1/fine_tuning/jobs", job),
            "export_id": create("/v1/exports", {"source": {"model": "tiny-llama-test"}}),
            "evaluation_id": create(
                "/v1/evaluations", {"evaluation_file": valid, "targets": ["tiny-llama-test"], "text_template": TEMPLATE}
            ),
            "sweep_id": create(
                "/v1/sweeps",
                {
                    "fine_tuning": job | {"validation_file": valid, "max_steps": 2},
                    "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
                    "num_trials": 2,
                },
            ),
            "webhook_endpoint_id": create(
                "/v1/webhook_endpoints",
                {"name": "fuzz", "url": webhook_receiver, "event_types": ["fine_tuning.job.succeeded"]},
            ),
            "model_id": "tiny-llama-test",
            "upload_id": create(
                "/v1/uploads",
                {"bytes": 4096, "filename": "d.jsonl", "mime_type": "application/jsonl", "purpose": "fine-tune"},
            ),
        }
        with stack.session() as session:  # a checkpoint, shared with another project, for its permission routes
            checkpoint = Checkpoint(job_id=real["job_id"], step=1, metrics={}, file_id=train)
            session.add(checkpoint)
            session.flush()
            real["fine_tuned_model_checkpoint"] = f"tiny-llama-test:ckpt-step-1:{real['job_id']}"
            grantee = get_or_create_project(session, f"fuzz-grantee-{uuid.uuid4().hex[:8]}").id
        granted = http.post(
            f"/v1/fine_tuning/checkpoints/{real['fine_tuned_model_checkpoint']}/permissions",
            json={"project_ids": [grantee]},
        )
        assert granted.status_code == 200, granted.text
        real["permission_id"] = granted.json()["data"][0]["id"]
        admin_auth = {"Authorization": f"Bearer {admin}"}
        keys = http.get("/v1/admin/keys?limit=1000", headers=admin_auth).json()["data"]
        real["key_id"] = next(k["id"] for k in keys if k["hint"] == spare[:10])
    yield stack, auth, admin_auth, real
    stack.stop()
    redis.Redis.from_url(stack.env["GROVE_BROKER_URL"]).delete(queue)


def _spec() -> dict:
    """The app's OpenAPI spec, the one /openapi.json serves. (Built here rather than fetched from the server:
    schemathesis' lazy fixture loader does not run under pytest 9.)"""
    from api.app import create_app

    return create_app().openapi()


schema = schemathesis.openapi.from_dict(_spec())


def _use_real_ids(case, real: dict[str, str]) -> None:
    """Swap generated path ids for the project's real ones in two cases out of three (decided by the case)."""
    params = case.path_parameters or {}
    if not params or case.method.upper() == "DELETE":
        return  # deleting the real objects would leave later cases nothing to reach
    if case.query and "stream" in case.query:
        return  # a live event stream of a queued job lasts until the job ends
    if zlib.crc32(repr(sorted(params.items())).encode()) % 3 == 0:
        return
    for name in params:
        if name in real:
            params[name] = real[name]


def _check(case, fuzz_target) -> None:
    stack, auth, admin_auth, real = fuzz_target
    _use_real_ids(case, real)
    headers = admin_auth if case.path.startswith("/v1/admin/") else auth
    case.call_and_validate(
        base_url=stack.base_url,
        headers=headers,
        checks=[checks.not_a_server_error, checks.response_schema_conformance, checks.content_type_conformance],
        timeout=30,
    )


def _operation_test(method: str, path: str):
    @schema.include(method=method, path=path).parametrize()
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=DERANDOMIZE,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def test(case, fuzz_target):
        _check(case, fuzz_target)

    return test


# One test function per operation, not one `schema.parametrize()` over all: under pytest 9 schemathesis gives every
# operation's item the same node id, and pytest-xdist, which schedules by node id, then ran only one of them.
for _operation in schema.get_all_operations():
    _method, _path = _operation.ok().method.upper(), _operation.ok().path
    _name = "test_no_server_error_" + "_".join(re.findall(r"[a-z0-9]+", f"{_method} {_path}".lower()))
    globals()[_name] = _operation_test(_method, _path)

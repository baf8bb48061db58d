"""Tenant isolation and key scopes over every route the app has, the route list generated from the app.

One project (the owner) holds one real object of every kind: files, fine-tuning jobs with events and a
checkpoint, an export, an evaluation and a sweep (each with a report), a webhook endpoint with a delivery.
A second project's key must get 404 `not_found` on every route that names one of them, must not see them in
any list, and cannot use them in a create. An admin key gets 403 on every tenant route, a project key 403 on
every admin route. Checkpoint permissions take either key (the owner's project keys and admin keys manage them):
another project gets 404 there too, a project granted the checkpoint included.

A route this module has no mapping for fails `test_every_route_is_mapped`: a path parameter not in
PATH_PARAMS, a collection route not in LISTS or CREATES, a body route without a body in BODIES, or a route
without a key that is not in PUBLIC. A new route cannot escape the test.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from api.deps import admin_read, caller_read, get_admin_key, get_caller, get_project, project_read
from tests.conftest import emotion_rows, new_key

TEMPLATE = "{text} -> {label}"
SHARED = "shared"  # a path parameter naming something every project sees alike (the base models)

# Routes that take no key at all.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
# Path parameter of a tenant route -> the kind of the owner's object it names.
PATH_PARAMS = {
    "file_id": "file",
    "job_id": "fine_tune",
    "export_id": "export",
    "evaluation_id": "evaluation",
    "sweep_id": "sweep",
    "webhook_endpoint_id": "webhook_endpoint",
    "upload_id": "upload",
    "model_id": SHARED,
    "fine_tuned_model_checkpoint": "checkpoint_name",
    "permission_id": "permission",
}
# Path parameters of admin routes (keys and base models belong to no tenant; only admin keys change them).
ADMIN_PATH_PARAMS = {"key_id", "model_id"}
# Tenant collection routes that list: the kinds of the owner's objects each must show the owner.
LISTS = {
    "/v1/files": ["file", "training_file"],
    "/v1/fine_tuning/jobs": ["fine_tune", "fine_tune_2"],
    "/v1/exports": ["export"],
    "/v1/evaluations": ["evaluation"],
    "/v1/sweeps": ["sweep"],
    "/v1/webhook_endpoints": ["webhook_endpoint"],
    "/v1/models": [],
    "/v1/webhook_event_types": [],
}


def creates(ids: dict[str, str]) -> dict[str, list[dict]]:
    """Tenant create routes -> bodies that name the owner's objects (each must be refused for another project).
    An empty list: the body names no other object."""
    pc = {"model": "tiny-llama-test", "training_file": ids["training_file"], "text_template": TEMPLATE}
    return {
        "/v1/files": [],
        "/v1/uploads": [],
        "/v1/webhook_endpoints": [],
        "/v1/fine_tuning/jobs": [
            pc,
            pc | {"training_file": ids["other_file"], "validation_file": ids["training_file"]},
            pc | {"training_file": ids["other_file"], "from_job": ids["fine_tune"]},
            pc | {"training_file": ids["other_file"], "from_checkpoint": ids["checkpoint"]},
            pc | {"training_file": ids["other_file"], "from_checkpoint": ids["checkpoint_name"]},
        ],
        "/v1/exports": [
            {"source": {"adapters": [{"fine_tuning_job": ids["fine_tune"]}]}},
            {"source": {"adapters": [{"fine_tuning_job": ids["fine_tune"], "checkpoint": ids["checkpoint"]}]}},
        ],
        "/v1/evaluations": [
            {"evaluation_file": ids["training_file"], "targets": ["tiny-llama-test"], "text_template": TEMPLATE},
            {"evaluation_file": ids["other_file"], "targets": [{"fine_tuning_job": ids["fine_tune"]}]},
            {"evaluation_file": ids["other_file"], "targets": [{"export_job": ids["export"]}]},
            {"evaluation_file": ids["other_file"], "targets": [ids["checkpoint_name"]], "text_template": TEMPLATE},
        ],
        "/v1/sweeps": [
            {
                "fine_tuning": pc | {"validation_file": ids["validation_file"], "max_steps": 2},
                "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
            }
        ],
    }


def bodies(ids: dict[str, str]) -> dict[tuple[str, str], dict]:
    """Bodies of the routes on one object that take one (valid, so that only the tenancy check can refuse them)."""
    return {
        ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}"): {"name": "stolen"},
        ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret"): {},
        ("POST", "/v1/webhook_endpoints/{webhook_endpoint_id}/test"): {"event_type": "fine_tuning.job.succeeded"},
        ("POST", "/v1/admin/keys"): {"project": "anything"},
        ("POST", "/v1/uploads/{upload_id}/complete"): {"part_ids": [ids["upload_part"]]},
        ("POST", "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions"): {
            "project_ids": [ids.get("grantee_project", "proj-x")]
        },
    }


@dataclass
class Route:
    method: str
    path: str
    params: list[str]
    auth: str | None  # "project", "admin", "any" (either key) or None
    body: bool


def _auth_of(route) -> str | None:
    if not isinstance(route, APIRoute):
        return None
    found, stack = set(), [route.dependant]
    while stack:
        dependant = stack.pop()
        found |= {dependant.call}
        stack.extend(dependant.dependencies)
    if found & {get_caller, caller_read}:
        return "any"
    if found & {get_project, project_read}:
        return "project"
    return "admin" if found & {get_admin_key, admin_read} else None


def app_routes(app) -> list[Route]:
    routes = []
    for context in iter_route_contexts(app.routes):
        original = context.original_route
        for method in sorted((context.methods or set()) - {"HEAD"}):
            routes.append(
                Route(
                    method=method,
                    path=context.path,
                    params=list(context.param_convertors),
                    auth=_auth_of(original),
                    body=isinstance(original, APIRoute) and original.body_field is not None,
                )
            )
    return routes


def tenant_routes(app, auth: tuple[str, ...] = ("project", "any")) -> list[Route]:
    """Routes that reach a project's objects: project keys only, or (with "any") admin keys as well."""
    return [r for r in app_routes(app) if r.auth in auth]


@dataclass
class Owner:
    client: object
    auth: dict
    other: dict
    admin: dict
    ids: dict[str, str] = field(default_factory=dict)

    def get(self, path, headers=None, **kw):
        return self.client.get(path, headers=headers or self.auth, **kw)


@pytest.fixture(scope="module")
def owner(app):
    """The owner's project with one object of every kind, and a second project's key."""
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from api.services.keys import create_admin_key
    from models.db import session_scope
    from models.job import Checkpoint, Job
    from models.project import ApiKey, hash_key

    with TestClient(app) as client:
        with session_scope() as session:
            admin = create_admin_key(session)
        o = Owner(
            client=client,
            auth={"Authorization": f"Bearer {new_key(f'owner-{uuid.uuid4().hex[:8]}')}"},
            other={"Authorization": f"Bearer {new_key(f'other-{uuid.uuid4().hex[:8]}')}"},
            admin={"Authorization": f"Bearer {admin}"},
        )

        def upload(headers, rows, name):
            body = "".join(json.dumps(r) + "\n" for r in rows)
            response = client.post(
                "/v1/files", headers=headers, files={"file": (name, body)}, data={"purpose": "fine-tune"}
            )
            assert response.status_code == 200, response.text
            return response.json()["id"]

        def create(path, body):
            response = client.post(path, headers=o.auth, json=body)
            assert response.status_code == 200, (path, response.text)
            return response.json()["id"]

        ids = o.ids
        ids["training_file"] = upload(o.auth, emotion_rows(24), "train.jsonl")
        ids["validation_file"] = upload(o.auth, emotion_rows(10, offset=24), "valid.jsonl")
        ids["file"] = ids["training_file"]
        ids["other_file"] = upload(o.other, emotion_rows(24), "mine.jsonl")  # the other project's own file
        job = {"model": "tiny-llama-test", "training_file": ids["training_file"], "text_template": TEMPLATE}
        ids["fine_tune"] = create("/v1/fine_tuning/jobs", job)
        ids["fine_tune_2"] = create("/v1/fine_tuning/jobs", job | {"suffix": "second"})
        ids["export"] = create("/v1/exports", {"source": {"model": "tiny-llama-test"}})
        ids["evaluation"] = create(
            "/v1/evaluations",
            {"evaluation_file": ids["validation_file"], "targets": ["tiny-llama-test"], "text_template": TEMPLATE},
        )
        ids["sweep"] = create(
            "/v1/sweeps",
            {
                "fine_tuning": job | {"validation_file": ids["validation_file"], "max_steps": 2},
                "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
                "num_trials": 2,
            },
        )
        ids["webhook_endpoint"] = create(
            "/v1/webhook_endpoints",
            {"name": "owner", "url": "http://127.0.0.1:9/hook", "event_types": ["fine_tuning.job.cancelled"]},
        )
        # A pending multipart upload holding one part: the whole of a valid dataset.
        part = "".join(json.dumps(r) + "\n" for r in emotion_rows(12)).encode()
        body = {"bytes": len(part), "filename": "big.jsonl", "mime_type": "application/jsonl", "purpose": "fine-tune"}
        ids["upload"] = create("/v1/uploads", body)
        response = client.post(f"/v1/uploads/{ids['upload']}/parts", headers=o.auth, files={"data": ("p", part)})
        assert response.status_code == 200, response.text
        ids["upload_part"] = response.json()["id"]
        with session_scope() as session:
            checkpoint = Checkpoint(job_id=ids["fine_tune"], step=1, metrics={}, file_id=ids["training_file"])
            session.add(checkpoint)
            session.flush()
            ids["checkpoint"] = checkpoint.id
            ids["checkpoint_name"] = f"tiny-llama-test:ckpt-step-1:{ids['fine_tune']}"
            # Reports the owner can read (any of the owner's files serves as one here).
            for kind in ("evaluation", "sweep"):
                session.get(Job, ids[kind]).result_files = [ids["validation_file"]]
        # Shared with a third project (not the other one, whose uses the tests below refuse).
        grantee = new_key(f"grantee-{uuid.uuid4().hex[:8]}")
        with session_scope() as session:
            ids["grantee_project"] = session.scalar(
                select(ApiKey.project_id).where(ApiKey.key_hash == hash_key(grantee))
            )
        granted = client.post(
            f"/v1/fine_tuning/checkpoints/{ids['checkpoint_name']}/permissions",
            headers=o.auth,
            json={"project_ids": [ids["grantee_project"]]},
        )
        assert granted.status_code == 200, granted.text
        ids["permission"] = granted.json()["data"][0]["id"]
        # A cancel gives the endpoint a delivery (fine_tuning.job.cancelled).
        assert client.post(f"/v1/fine_tuning/jobs/{ids['fine_tune_2']}/cancel", headers=o.auth).status_code == 200
        deliveries = o.get(f"/v1/webhook_endpoints/{ids['webhook_endpoint']}/deliveries").json()["data"]
        ids["delivery"] = deliveries[0]["id"]
        event = o.get(f"/v1/fine_tuning/jobs/{ids['fine_tune']}/events").json()["data"][0]
        ids["event"] = event["id"]
        yield o


def _path(route: Route, ids: dict[str, str]) -> str:
    values = {}
    for param in route.params:
        kind = PATH_PARAMS[param]
        values[param] = "tiny-llama-test" if kind == SHARED else ids[kind]
    return route.path.format(**values)


def _call(client, method: str, path: str, headers: dict, body: dict | None = None, **kw):
    return client.request(method, path, headers=headers, json=body, **kw)


def test_every_route_is_mapped(app):
    """Fails for any route that would escape the tests below: add it to the tables at the top of this module."""
    placeholder = {
        k: k
        for k in (
            "training_file",
            "validation_file",
            "other_file",
            "fine_tune",
            "checkpoint",
            "upload_part",
            "checkpoint_name",
        )
    }
    create_paths = set(creates(placeholder | {"export": "e"}))
    body_routes = set(bodies(placeholder))
    routes = app_routes(app)
    assert len(routes) >= 45  # the generator sees the included routers' routes
    unmapped = []
    for route in routes:
        key = (route.method, route.path)
        if route.auth is None:
            if key not in PUBLIC:
                unmapped.append(f"{key}: takes no key and is not in PUBLIC")
            continue
        known = ADMIN_PATH_PARAMS if route.auth == "admin" else PATH_PARAMS
        unmapped += [f"{key}: path parameter {p!r} not mapped" for p in route.params if p not in known]
        if route.auth == "project" and not route.params:
            if route.method == "GET" and route.path not in LISTS:
                unmapped.append(f"{key}: list route not in LISTS")
            if route.method == "POST" and route.path not in create_paths:
                unmapped.append(f"{key}: create route not in CREATES")
            if route.method not in ("GET", "POST"):
                unmapped.append(f"{key}: collection route with a method this test does not handle")
        elif route.body and route.method != "GET" and key not in body_routes and route.path not in create_paths:
            unmapped.append(f"{key}: takes a body; give one in BODIES")
    assert not unmapped, "\n".join(unmapped)
    # And the mappings name no route that is gone.
    paths = {r.path for r in routes}
    assert set(LISTS) <= paths and create_paths <= paths and {p for _, p in body_routes} <= paths


def test_another_projects_objects_are_404_on_every_route(owner, app):
    """Every route naming an object, with the other project's key and the owner's real id: 404 not_found.
    GETs are checked with the owner's key too, so that the 404 is the tenancy check and not a bad path."""
    body_of = bodies(owner.ids)
    checked = []
    for route in tenant_routes(app):
        kinds = [PATH_PARAMS[p] for p in route.params]
        if not kinds or kinds == [SHARED]:
            continue
        path = _path(route, owner.ids)
        body = body_of.get((route.method, route.path))
        response = _call(owner.client, route.method, path, owner.other, body)
        assert response.status_code == 404, (route.method, path, response.status_code, response.text)
        error = response.json()["error"]
        # The service's own 404 (the route matched, the lookup failed): code not_found, naming the id.
        named = [owner.ids[kind] for kind in kinds if kind != SHARED]
        assert error["code"] == "not_found" and named[0] in error["message"], (route.method, path, error)
        if route.method == "GET":
            mine = _call(owner.client, "GET", path, owner.auth)
            assert mine.status_code == 200, (path, mine.text)
        checked.append((route.method, route.path))
    assert len(checked) >= 24, checked  # as of this writing; more routes only add to it
    # The live event stream too, and resource ids that are not the route's kind.
    ids = owner.ids
    for path in (
        f"/v1/fine_tuning/jobs/{ids['fine_tune']}/events?stream=true",
        f"/v1/files/{ids['delivery']}",
        f"/v1/exports/{ids['fine_tune']}",
        f"/v1/fine_tuning/jobs/{ids['sweep']}",
    ):
        assert owner.get(path, owner.other).status_code == 404, path


def test_the_owner_still_has_everything(owner, app):
    """The other project's cancels, deletes, updates and rotations (the test above) changed nothing."""
    ids = owner.ids
    assert owner.get(f"/v1/files/{ids['file']}/content").status_code == 200
    for path in (f"/v1/fine_tuning/jobs/{ids['fine_tune']}", f"/v1/exports/{ids['export']}",
                 f"/v1/evaluations/{ids['evaluation']}", f"/v1/sweeps/{ids['sweep']}"):  # fmt: skip
        assert owner.get(path).json()["status"] == "queued", path
    endpoint = owner.get(f"/v1/webhook_endpoints/{ids['webhook_endpoint']}").json()
    assert endpoint["name"] == "owner"
    # The upload was neither cancelled nor completed by the other project, and its part is still there.
    done = owner.client.post(
        f"/v1/uploads/{ids['upload']}/complete", headers=owner.auth, json={"part_ids": [ids["upload_part"]]}
    )
    assert done.status_code == 200 and done.json()["status"] == "completed", done.text
    permissions = owner.get(f"/v1/fine_tuning/checkpoints/{ids['checkpoint_name']}/permissions").json()["data"]
    assert [(p["id"], p["project_id"]) for p in permissions] == [(ids["permission"], ids["grantee_project"])]


def test_lists_never_show_another_projects_objects(owner, app):
    """Every list route: the owner's ids appear in the owner's list and nowhere in the other project's."""
    ids = owner.ids
    secret_ids = {v for k, v in ids.items() if k != "other_file"}
    lists = [r for r in tenant_routes(app) if r.method == "GET"]
    for route in lists:
        if route.params and PATH_PARAMS[route.params[0]] == SHARED:
            continue
        if route.params:  # lists under one object (events, checkpoints, deliveries) are 404: tested above
            continue
        for query in ("?limit=100", f"?limit=100&parent_id={ids['fine_tune']}"):
            theirs = owner.get(route.path + query, owner.other)
            if theirs.status_code == 400 and theirs.json()["error"]["code"] == "unknown_parameter":
                assert theirs.json()["error"]["param"] in ("limit", "parent_id"), (route.path, theirs.text)
                theirs = owner.get(route.path, owner.other)  # a list without that parameter refuses it
            assert theirs.status_code == 200, (route.path, theirs.text)
            leaked = [i for i in secret_ids if i in theirs.text]
            assert not leaked, (route.path, leaked)
        mine = owner.get(route.path + "?limit=100")
        mine = (mine if mine.status_code == 200 else owner.get(route.path)).json()
        listed = {item.get("id") for item in mine["data"] if isinstance(item, dict)}
        assert {ids[kind] for kind in LISTS[route.path]} <= listed, route.path
    # Sub-lists seen by the owner hold what was made above (so their 404s above hid real rows).
    assert (
        owner.get(f"/v1/fine_tuning/jobs/{ids['fine_tune']}/checkpoints").json()["data"][0]["id"] == ids["checkpoint"]
    )


def test_creates_cannot_use_another_projects_objects(owner, app):
    """Each create body naming an owner's object is refused for the other project, and creates nothing."""
    ids = owner.ids
    table = creates(ids)
    for route in [r for r in tenant_routes(app) if r.method == "POST" and not r.params]:
        for body in table[route.path]:
            response = owner.client.post(route.path, headers=owner.other, json=body)
            assert response.status_code in (400, 404), (route.path, body, response.text)
    for path in ("/v1/fine_tuning/jobs", "/v1/exports", "/v1/evaluations", "/v1/sweeps"):
        assert owner.get(path, owner.other).json()["data"] == [], path


def test_admin_keys_get_403_on_every_tenant_route(owner, app):
    body_of = bodies(owner.ids)
    table = creates(owner.ids)
    for route in tenant_routes(app, auth=("project",)):
        path = _path(route, owner.ids)
        body = body_of.get((route.method, route.path))
        if body is None and route.path in table and table[route.path]:
            body = table[route.path][0]
        response = _call(owner.client, route.method, path, owner.admin, body)
        assert response.status_code == 403, (route.method, path, response.text)
        assert response.json()["error"]["type"] == "permission_error"
    # The routes either key reaches: an admin key manages any project's checkpoint permissions.
    for route in tenant_routes(app, auth=("any",)):
        if route.method == "GET":
            assert _call(owner.client, "GET", _path(route, owner.ids), owner.admin).status_code == 200, route.path


def test_project_keys_get_403_on_every_admin_route(owner, app):
    admin_routes = [r for r in app_routes(app) if r.auth == "admin"]
    assert {(r.method, r.path) for r in admin_routes} >= {
        ("POST", "/v1/admin/keys"),
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/{model_id}"),
    }
    keys = owner.get("/v1/admin/keys?limit=1", owner.admin).json()["data"]
    body_of = bodies(owner.ids)
    for route in admin_routes:
        path = route.path.format(key_id=keys[0]["id"], model_id="tiny-llama-test")
        for headers in (owner.auth, owner.other):
            response = _call(owner.client, route.method, path, headers, body_of.get((route.method, route.path)))
            assert response.status_code == 403, (route.method, path, response.text)
            assert response.json()["error"]["code"] == "insufficient_scope"


def test_missing_or_wrong_key_is_401(client, app):
    for headers in ({}, {"Authorization": "Bearer grove-wrong"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/files", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    # Every route that takes a key refuses a request without one.
    for route in [r for r in app_routes(app) if r.auth]:
        path = route.path.format(**{p: "x" for p in route.params})
        response = client.request(route.method, path)
        assert response.status_code == 401, (route.method, path, response.text)
    assert client.get("/healthz").status_code == 200

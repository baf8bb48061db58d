"""Issue 16, hostile bodies: oversized and deeply nested JSON, huge numbers, duplicate keys, invalid UTF-8, NUL
characters in fields, Unicode file names, a 10,000-line error file, and abused Authorization headers, against the
in-process app on every kind of body the API takes (file upload, fine-tuning job, export, evaluation, sweep,
webhook endpoint).

Each row is one attack with the status, `param` and `code` it must get: never a 500, and a 400 names the field
(or the file's line) at fault. After each refused row nothing was stored: no file, job or webhook endpoint row in
the tenant's project, no temp file left in the store's tmp/, and the app still answers.

Rows that found a bug (fixed with them): a NUL character in a metadata key or value, a text template, a gate
prompt, a label, a stop string or a regex was stored, and an unpaired surrogate in a metadata value was a 500;
integers past 64 bits in an int field without an upper bound were stored, and Infinity in a float field without
one was refused by the database naming no field, as was a NUL in any text column (models/request_body.py); deep
nesting and 10**10000 in an uploaded line were 500s, and an unknown chat role was echoed whole, megabytes of it
(models/datasets.py); a JSON body that was not UTF-8, too deep or held a 10,000-digit number got "There was an
error parsing the body" naming nothing, and a raw control character got its character offset as `param`
(api/errors.py); with two Authorization headers the route checked the first and the rate limits counted the
last, so wrong keys sent before a valid one never met the throttle on failed authentication (api/deps.py).
"""

from __future__ import annotations

import copy
import json
import re
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest

from models.config import get_settings
from models.file import File
from models.job import Job
from models.webhook import WebhookEndpoint
from tests.api.test_files import storage_tmp_files
from tests.conftest import emotion_rows
from tests.security.conftest import Tenant, assert_refused

TEMPLATE = "{text} -> {label}"
LR = {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}
NUL = "a\u0000b"
DEEP = 100_000
FAST_SECONDS = 1.0
# Where a raw piece of JSON goes: this string, quoted, is replaced by it after the body is encoded.
HOLE = "@@hostile@@"


# --- the kinds of JSON body --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    path: str
    valid: Callable[[Tenant], dict]
    text: tuple  # a free-text field (NUL, UTF-8 rows)
    number: tuple  # a float field without an upper bound (Infinity, NaN rows)
    integer: tuple  # an int field without an upper bound (the 64-bit row)
    # A top-level field, a value the route refuses (naming the field) and one it takes: for duplicate keys.
    duplicate: tuple[str, Any, Any]


KINDS = {
    "fine-tune": Kind(
        "/v1/fine_tuning/jobs",
        lambda t: {
            "model": "tiny-llama-test",
            "training_file": t.training,
            "validation_file": t.validation,
            "text_template": TEMPLATE,
            "max_steps": 2,
        },
        text=("metadata", "note"),
        number=("early_stopping_threshold",),
        integer=("log_every_steps",),
        duplicate=("text_template", "{text:>99} -> {label}", TEMPLATE),
    ),
    "export": Kind(
        "/v1/exports",
        lambda t: {"source": {"model": "tiny-llama-test"}},
        text=("metadata", "note"),
        number=("gate", "max_mean_abs_logit_diff"),
        integer=("gate", "n_prompts"),
        duplicate=("precision", "int3", "int4"),
    ),
    "evaluation": Kind(
        "/v1/evaluations",
        lambda t: {"evaluation_file": t.validation, "targets": ["tiny-llama-test"], "text_template": TEMPLATE},
        text=("metadata", "note"),
        number=("generation", "temperature"),
        integer=("report_examples",),
        duplicate=("text_template", "{text!r} -> {label}", TEMPLATE),
    ),
    "sweep": Kind(
        "/v1/sweeps",
        lambda t: t.sweep_body({"learning_rate": LR}),
        text=("metadata", "note"),
        number=("fine_tuning", "early_stopping_threshold"),
        integer=("pruning", "n_warmup_steps"),
        duplicate=("strategy", "annealing", "random"),
    ),
    "webhook": Kind(
        "/v1/webhook_endpoints",
        lambda t: {"name": "hooks", "url": "http://127.0.0.1:9/hook", "event_types": ["fine_tuning.job.failed"]},
        text=("name",),
        number=("name",),
        integer=("name",),
        duplicate=("event_types", ["fine_tuning.job.exploded"], ["fine_tuning.job.failed"]),
    ),
}
ALL_KINDS = pytest.mark.parametrize("kind", list(KINDS))


def with_value(body: dict, path: tuple, value: Any) -> dict:
    """`body` with `value` at `path`, the objects and arrays on the way made as needed."""
    body = copy.deepcopy(body)
    node: Any = body
    for step, after in zip(path, path[1:], strict=False):
        if isinstance(step, int):
            node = node[step]
            continue
        if not isinstance(node.get(step), dict | list):
            node[step] = [None] * (after + 1) if isinstance(after, int) else {}
        node = node[step]
    node[path[-1]] = value
    return body


def spliced(body: dict, path: tuple, raw: bytes) -> bytes:
    """`body` encoded, with the raw bytes `raw` as the JSON value at `path`."""
    encoded = json.dumps(with_value(body, path, HOLE)).encode()
    return encoded.replace(json.dumps(HOLE).encode(), raw, 1)


def spliced_key(body: dict, path: tuple, raw_key: bytes) -> bytes:
    """`body` encoded, with a member whose name is the raw bytes `raw_key` in the object at `path`."""
    encoded = json.dumps(with_value(body, (*path, HOLE), "v")).encode()
    return encoded.replace(json.dumps(HOLE).encode(), raw_key, 1)


def param_of(path: tuple) -> str:
    return ".".join(str(step) for step in path)


# --- what a refused request must leave behind ----------------------------------------------------------------


def stored(t: Tenant) -> dict:
    return {
        "rows": {table.__name__: t.count(table) for table in (File, Job, WebhookEndpoint)},
        "store tmp/": storage_tmp_files(),
    }


def still_answers(t: Tenant) -> None:
    assert t.client.get("/healthz").status_code == 200
    assert t.client.get("/v1/models", headers=t.headers).status_code == 200


@pytest.fixture
def nothing_stored(tenant) -> Iterator[Tenant]:
    """The tenant, checked after the test: nothing stored, and the app still answers."""
    before = stored(tenant)
    yield tenant
    assert stored(tenant) == before
    still_answers(tenant)


def post_raw(t: Tenant, path: str, content: bytes | Iterator[bytes], headers: dict | None = None):
    return t.client.post(
        path, headers=t.headers | {"content-type": "application/json"} | (headers or {}), content=content
    )


# --- JSON bodies -------------------------------------------------------------------------------------------


def test_every_json_body_is_checked_for_unstorable_values(app):
    """The NUL, surrogate, non-finite and 64-bit rows hold for every JSON body, a route added later included:
    each body's model is a RequestBody (models/request_body.py)."""
    from fastapi.routing import APIRoute, iter_route_contexts

    from models.request_body import RequestBody

    bodies = {}
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute) and route.body_field is not None:
            annotation = route.body_field.field_info.annotation
            models = [arg for arg in (*typing.get_args(annotation), annotation) if isinstance(arg, type)]
            bodies[f"{sorted(context.methods)} {context.path}"] = models
    assert len(bodies) >= 8, bodies  # as of this writing: every create, the webhook update, test and rotation
    unchecked = {
        route: models for route, models in bodies.items() if not any(issubclass(m, RequestBody) for m in models)
    }
    assert not unchecked, unchecked


@ALL_KINDS
def test_the_bodies_themselves_are_taken(tenant, kind):
    """The control: each row below fails for its attack, not for the body it is made of."""
    response = tenant.post(KINDS[kind].path, KINDS[kind].valid(tenant))
    assert response.status_code == 200, response.text


def _oversized(t: Tenant, kind: Kind) -> bytes:
    return json.dumps(kind.valid(t) | {"pad": "x" * get_settings().max_json_body_bytes}).encode()


def _chunks(content: bytes) -> Iterator[bytes]:  # no Content-Length: the app counts what arrives
    for start in range(0, len(content), 64 * 1024):
        yield content[start : start + 64 * 1024]


# Each attack: (tenant, kind) -> (body bytes or chunks, status, param, code).
Attack = Callable[[Tenant, Kind], tuple[bytes | Iterator[bytes], int, str | None, str | None]]

JSON_ATTACKS: dict[str, Attack] = {
    "oversized": lambda t, k: (_oversized(t, k), 413, None, "request_too_large"),
    "oversized-chunked": lambda t, k: (_chunks(_oversized(t, k)), 413, None, "request_too_large"),
    "nested-arrays": lambda t, k: (spliced(k.valid(t), k.text, b"[" * DEEP + b"]" * DEEP), 400, None, None),
    "nested-objects": lambda t, k: (
        spliced(k.valid(t), k.text, b'{"a":' * DEEP + b"1" + b"}" * DEEP),
        400,
        None,
        None,
    ),
    "1e999": lambda t, k: (spliced(k.valid(t), k.number, b"1e999"), 400, param_of(k.number), None),
    "-Infinity": lambda t, k: (spliced(k.valid(t), k.number, b"-Infinity"), 400, param_of(k.number), None),
    "NaN": lambda t, k: (spliced(k.valid(t), k.number, b"NaN"), 400, param_of(k.number), None),
    "10**10000": lambda t, k: (spliced(k.valid(t), k.integer, b"1" + b"0" * 10_000), 400, None, None),
    "10**4000": lambda t, k: (spliced(k.valid(t), k.integer, b"1" + b"0" * 4000), 400, param_of(k.integer), None),
    "2**63": lambda t, k: (spliced(k.valid(t), k.integer, str(2**63).encode()), 400, param_of(k.integer), None),
    "invalid-utf8-value": lambda t, k: (spliced(k.valid(t), k.text, b'"caf\xe9 \xff"'), 400, param_of(k.text), None),
    "invalid-utf8-key": lambda t, k: (
        spliced_key(k.valid(t), k.text[:-1], b'"k\xc3\x28"'),
        400,
        param_of(k.text[:-1]) or None,
        None,
    ),
    "invalid-utf8-overlong-nul": lambda t, k: (
        spliced(k.valid(t), k.text, b'"a\xc0\x80b"'),
        400,
        param_of(k.text),
        None,
    ),
    "unpaired-surrogate": lambda t, k: (spliced(k.valid(t), k.text, b'"\\ud800"'), 400, param_of(k.text), None),
    "nul-escape": lambda t, k: (spliced(k.valid(t), k.text, b'"a\\u0000b"'), 400, param_of(k.text), None),
    "raw-nul-byte": lambda t, k: (spliced(k.valid(t), k.text, b'"a\x00b"'), 400, None, None),
}

# What the 400's message must say, where a row's param alone does not tell.
MESSAGES = {
    "nested-arrays": "nested too deeply",
    "nested-objects": "nested too deeply",
    "1e999": "finite",
    "-Infinity": "finite",
    "NaN": "finite",
    "10**10000": "digits",
    "10**4000": "64 bits",
    "2**63": "64 bits",
    "invalid-utf8-value": "not valid UTF-8 (byte 0xe9",
    "invalid-utf8-key": "not valid UTF-8",
    "invalid-utf8-overlong-nul": "not valid UTF-8 (byte 0xc0",
    "unpaired-surrogate": "surrogate",
    "nul-escape": "NUL",
    "raw-nul-byte": "not valid JSON: Invalid control character",  # JSON strings escape their control characters
}


@ALL_KINDS
@pytest.mark.parametrize("attack", list(JSON_ATTACKS))
def test_a_hostile_json_body_is_refused_naming_the_field(nothing_stored, kind, attack):
    t = nothing_stored
    content, status, param, code = JSON_ATTACKS[attack](t, KINDS[kind])
    started = time.monotonic()
    response = post_raw(t, KINDS[kind].path, content)
    seconds = time.monotonic() - started
    error = assert_refused(response, status, param)
    assert error["code"] == code, error
    if attack in MESSAGES:
        assert MESSAGES[attack] in error["message"], error
    if param is not None:
        assert error["message"].startswith(f"{param}: "), error
    assert len(response.content) < 2048  # the answer never echoes the body
    assert seconds < FAST_SECONDS, f"{attack} took {seconds:.2f} s"


# NUL characters in the string fields of every body: PostgreSQL refuses NUL in text, so each would be a 500, a
# 400 naming nothing, or (in a JSON column) stored to break whatever reads it next.
NUL_FIELDS = [
    pytest.param("fine-tune", ("suffix",), NUL, "suffix", id="fine-tune-suffix"),
    pytest.param("fine-tune", ("metadata", "note"), NUL, "metadata.note", id="fine-tune-metadata-value"),
    pytest.param("fine-tune", ("metadata",), {NUL: "v"}, "metadata", id="fine-tune-metadata-key"),
    pytest.param("fine-tune", ("text_template",), "{text}\u0000{label}", "text_template", id="fine-tune-template"),
    pytest.param("fine-tune", ("training_file",), NUL, "training_file", id="fine-tune-training-file"),
    pytest.param("fine-tune", ("from_job",), NUL, "from_job", id="fine-tune-from-job"),
    pytest.param("fine-tune", ("adapter", "target_modules", 0), NUL, "adapter.target_modules.0", id="fine-tune-module"),
    pytest.param(
        "fine-tune",
        ("evaluation", "text_template"),
        "{text}\u0000{label}",
        "evaluation.text_template",
        id="fine-tune-evaluation-template",
    ),
    pytest.param(
        "fine-tune", ("export", "gate", "prompts", 0), NUL, "export.gate.prompts.0", id="fine-tune-gate-prompt"
    ),
    pytest.param("export", ("metadata", "note"), NUL, "metadata.note", id="export-metadata"),
    pytest.param("export", ("source", "model"), NUL, "source.model", id="export-model"),
    pytest.param(
        "export",
        ("source", "adapters", 0),
        {"fine_tuning_job": "ftjob-x", "name": NUL},
        "source.adapters.0.name",
        id="export-adapter-name",
    ),
    pytest.param("export", ("gate", "prompts", 0), NUL, "gate.prompts.0", id="export-gate-prompt"),
    pytest.param("evaluation", ("metadata", "note"), NUL, "metadata.note", id="evaluation-metadata"),
    pytest.param("evaluation", ("text_template",), "{text}\u0000{label}", "text_template", id="evaluation-template"),
    pytest.param("evaluation", ("evaluation_file",), NUL, "evaluation_file", id="evaluation-file"),
    pytest.param("evaluation", ("targets", 0), NUL, "targets.0", id="evaluation-target"),
    pytest.param("evaluation", ("labels", "labels"), ["joy", NUL], "labels.labels.1", id="evaluation-label"),
    pytest.param("evaluation", ("generation", "stop", 0), NUL, "generation.stop.0", id="evaluation-stop"),
    pytest.param("evaluation", ("normalization", "regex"), NUL, "normalization.regex", id="evaluation-regex"),
    pytest.param("sweep", ("metadata", "note"), NUL, "metadata.note", id="sweep-metadata"),
    pytest.param(
        "sweep",
        ("fine_tuning", "text_template"),
        "{text}\u0000{label}",
        "fine_tuning.text_template",
        id="sweep-template",
    ),
    pytest.param("sweep", ("fine_tuning", "suffix"), NUL, "fine_tuning.suffix", id="sweep-suffix"),
    pytest.param(
        "sweep",
        ("search_space", "lr_scheduler"),
        {"type": "categorical", "values": ["linear", NUL]},
        "search_space.lr_scheduler.values.1",
        id="sweep-categorical-value",
    ),
    pytest.param(
        "sweep",
        ("objective",),
        {"metric": "accuracy", "evaluation_file": NUL},
        "objective.evaluation_file",
        id="sweep-objective-file",
    ),
    pytest.param("webhook", ("name",), NUL, "name", id="webhook-name"),
    pytest.param("webhook", ("url",), "http://127.0.0.1:9/hook\u0000", "url", id="webhook-url"),
    pytest.param("webhook", ("url",), "http://exa\u0000mple.com/hook", "url", id="webhook-url-host"),
    pytest.param("webhook", ("event_types", 0), NUL, "event_types.0", id="webhook-event-type"),
]


@pytest.mark.parametrize(("kind", "path", "value", "param"), NUL_FIELDS)
def test_a_nul_character_is_refused_naming_the_field(nothing_stored, kind, path, value, param):
    t = nothing_stored
    body = with_value(KINDS[kind].valid(t), path, value)
    error = assert_refused(t.post(KINDS[kind].path, body), 400, param)
    assert "NUL" in error["message"] and error["message"].startswith(f"{param}: "), error


def test_a_nul_character_is_refused_when_a_webhook_endpoint_changes(nothing_stored):
    t = nothing_stored
    created = t.post(KINDS["webhook"].path, KINDS["webhook"].valid(t))
    assert created.status_code == 200, created.text
    endpoint = created.json()["id"]
    try:
        error = assert_refused(t.post(f"/v1/webhook_endpoints/{endpoint}", {"name": NUL}), 400, "name")
        assert "NUL" in error["message"]
        assert t.client.get(f"/v1/webhook_endpoints/{endpoint}", headers=t.headers).json()["name"] == "hooks"
    finally:
        assert t.client.delete(f"/v1/webhook_endpoints/{endpoint}", headers=t.headers).status_code == 200


@ALL_KINDS
@pytest.mark.parametrize("hostile_last", [True, False], ids=["hostile-last", "hostile-first"])
def test_duplicate_keys_the_last_one_is_the_one_checked_and_stored(tenant, kind, hostile_last):
    """JSON leaves duplicate names to the reader; Grove's (Python's) keeps the last. What matters is that the value
    checked is the value stored: a hostile first copy behind a benign last one is never what a job carries."""
    k = KINDS[kind]
    field, hostile, benign = k.duplicate
    body = k.valid(tenant)
    body.pop(field, None)
    first, last = (benign, hostile) if hostile_last else (hostile, benign)
    encoded = json.dumps(body)[:-1] + f", {json.dumps(field)}: {json.dumps(first)}, {json.dumps(field)}: "
    encoded += json.dumps(last) + "}"
    before = stored(tenant)
    response = post_raw(tenant, k.path, encoded.encode())
    if hostile_last:
        assert_refused(response, 400, field)
        assert stored(tenant) == before
        return
    assert response.status_code == 200, response.text
    answered = response.json()
    shown = answered.get(field, answered.get("settings", {}).get(field))
    assert shown == benign, answered
    if kind != "webhook":
        from models.db import session_scope

        with session_scope() as session:
            assert session.get(Job, answered["id"]).spec[field] == benign


# --- uploads -------------------------------------------------------------------------------------------------

BOUNDARY = "hostile-bodies-boundary"
GOOD_LINES = [json.dumps(row).encode() for row in emotion_rows(12)]


def multipart(filename: bytes, content: bytes) -> tuple[bytes, dict]:
    """A form with `content` as the file part, whose Content-Disposition carries `filename` as raw bytes."""
    body = b"".join(
        [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'.encode(),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode(),
            filename,
            b'"\r\nContent-Type: application/jsonl\r\n\r\n',
            content,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def upload(t: Tenant, content: bytes, filename: bytes = b"data.jsonl"):
    body, headers = multipart(filename, content)
    return t.client.post("/v1/files", headers=t.headers | headers, content=body)


def jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


LINE_13 = "line 13: "  # after the twelve good lines
UPLOAD_ATTACKS = [
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": "caf\xe9", "label": "joy"}']), LINE_13, "UnicodeDecodeError", id="invalid-utf8"
    ),
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": "\xc0\x80", "label": "joy"}']), LINE_13, "UnicodeDecodeError", id="overlong-nul"
    ),
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b', "label": "joy"}']),
        LINE_13,
        "nested too deeply",
        id="nested-arrays",
    ),
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b', "label": "joy"}']),
        LINE_13,
        "nested too deeply",
        id="nested-objects",
    ),
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": 1' + b"0" * 10_000 + b', "label": "joy"}']), LINE_13, "digits", id="10**10000"
    ),
    pytest.param(
        jsonl([*GOOD_LINES, b'{"text": "a\x00b", "label": "joy"}']), LINE_13, "Invalid control character", id="raw-nul"
    ),
    pytest.param(
        jsonl([b'{"messages": [{"role": "' + b"x" * 1_000_000 + b'", "content": "hi"}]}'] * 3),
        "line 1: messages[0] has unknown role 'xxxxxxxx",
        "line 3: ",
        id="megabyte-role-echoed",
    ),
]


@pytest.mark.parametrize(("content", "starts", "contains"), UPLOAD_ATTACKS)
def test_a_hostile_upload_is_refused_naming_the_line(nothing_stored, content, starts, contains):
    t = nothing_stored
    started = time.monotonic()
    response = upload(t, content)
    seconds = time.monotonic() - started
    error = assert_refused(response, 400, "file")
    assert error["code"] == "invalid_file" and error["message"].startswith(starts), error
    assert contains in error["message"], error
    assert len(response.content) < 2048, len(response.content)
    assert seconds < 5 * FAST_SECONDS, f"took {seconds:.2f} s"


def test_ten_thousand_bad_lines_name_the_first_twenty_and_count_the_rest(nothing_stored):
    t = nothing_stored
    # Not JSON, not an object, and (after the fields lines) the wrong shape: 10,000 bad lines after three good ones.
    bad = [b"not json", b"[1, 2]", b'"x"', b'{"prompt": "p", "completion": "c"}']
    response = upload(t, jsonl([*GOOD_LINES[:3], *(bad * 2500)]))
    error = assert_refused(response, 400, "file")
    named = [int(n) for n in re.findall(r"(?:^|; )line (\d+):", error["message"])]
    assert named == list(range(4, 24)), error["message"][:300]
    assert error["message"].endswith("; and 9,980 more bad lines (10,000 in all)"), error["message"][-200:]
    assert len(response.content) < 4096, len(response.content)


# --- Unicode file names ------------------------------------------------------------------------------------

CONTENT_DISPOSITION = re.compile(
    r"attachment; (?:filename=\"(?P<plain>[A-Za-z0-9!#$&+\-.^_`|~]+)\""
    r"|filename\*=utf-8''(?P<encoded>(?:[A-Za-z0-9!#$&+\-.^_`|~]|%[0-9A-F]{2})+))"
)

FILE_NAMES = [
    pytest.param("evil\u202egnp.jsonl".encode(), "evilgnp.jsonl", id="rtl-override"),
    pytest.param("\u2066data\u2069\u200f.jsonl".encode(), "data.jsonl", id="bidi-isolates"),
    pytest.param("📊 données.jsonl".encode(), "📊 données.jsonl", id="emoji-and-accents"),
    pytest.param("👩\u200d💻 team.jsonl".encode(), "👩💻 team.jsonl", id="emoji-zwj-sequence"),
    pytest.param(("e\u0301" * 300 + ".jsonl").encode(), ("e\u0301" * 300)[:255], id="combining-marks"),
    pytest.param(("名" * 1300).encode(), "名" * 255, id="1300-cjk-characters"),
    pytest.param(b"../../etc/passwd", "passwd", id="relative-path"),
    pytest.param(b"/var/lib/grove/storage/x.jsonl", "x.jsonl", id="absolute-path"),
    pytest.param(b"..\\..\\boot.ini", "boot.ini", id="windows-path"),
    pytest.param(b"..", "upload.jsonl", id="dot-dot"),
    pytest.param(b"dir/..", "upload.jsonl", id="ending-in-dot-dot"),
    pytest.param(b"a\x00b.jsonl", "ab.jsonl", id="nul"),
    pytest.param(b"a\x01\x1b[31mred\x7f.jsonl", "a[31mred.jsonl", id="control-characters"),
    pytest.param(b'a\\"b;c=d.jsonl', 'a"b;c=d.jsonl', id="quote-and-semicolon"),
    pytest.param(b"\xff\xfe.jsonl", "\xff\xfe.jsonl", id="not-utf8-read-as-latin1"),
    pytest.param(b"   \t ", "upload.jsonl", id="blank"),
]


@pytest.mark.parametrize(("given", "shown"), FILE_NAMES)
def test_a_unicode_file_name_is_stored_as_a_sane_bounded_display_name(tenant, given, shown):
    response = upload(tenant, jsonl(GOOD_LINES), filename=given)
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["filename"] == shown
    name = file["filename"]
    assert 0 < len(name) <= 255 and name not in {".", ".."} and not {"/", "\\"} & set(name)
    assert name.isprintable(), ascii(name)  # no control, format (bidi) or unassigned characters
    assert tenant.client.get(f"/v1/files/{file['id']}", headers=tenant.headers).json()["filename"] == shown

    download = tenant.client.get(f"/v1/files/{file['id']}/content", headers=tenant.headers)
    assert download.status_code == 200 and download.content == jsonl(GOOD_LINES)
    disposition = download.headers["content-disposition"]
    match = CONTENT_DISPOSITION.fullmatch(disposition)
    assert match, disposition  # RFC 6266: a plain token-safe filename, or an RFC 5987 filename*
    assert (match["plain"] or unquote(match["encoded"], errors="strict")) == name
    assert tenant.client.delete(f"/v1/files/{file['id']}", headers=tenant.headers).status_code == 200


def test_a_ten_thousand_character_file_name_is_refused(nothing_stored):
    """Past the 4 KiB a part's header may take: a 400 naming the file part, and nothing kept."""
    error = assert_refused(upload(nothing_stored, jsonl(GOOD_LINES), filename=b"n" * 10_000), 400, "file")
    assert "header" in error["message"]


# --- Authorization header abuse --------------------------------------------------------------------------

HEADERS: dict[str, Callable[[str], list[tuple[bytes, bytes]]]] = {
    "100-KB-key": lambda key: [(b"authorization", b"Bearer " + b"k" * 100_000)],
    "nul-in-key": lambda key: [(b"authorization", b"Bearer sk-\x00" + key.encode())],
    "utf8-key": lambda key: [(b"authorization", "Bearer sk-ключ".encode())],
    "latin1-key": lambda key: [(b"authorization", b"Bearer sk-\xff\xfe")],
    "scheme-only": lambda key: [(b"authorization", b"Bearer")],
    "basic-scheme": lambda key: [(b"authorization", b"Basic dXNlcjpwYXNz")],
    "valid-then-wrong": lambda key: [(b"authorization", f"Bearer {key}".encode()), (b"authorization", b"Bearer x")],
    "wrong-then-valid": lambda key: [(b"authorization", b"Bearer x"), (b"authorization", f"Bearer {key}".encode())],
    "1000-headers": lambda key: [(b"authorization", f"Bearer {key}".encode())] * 1000,
}
EXPECTED_HEADERS = {
    "valid-then-wrong": (400, "authorization", None),
    "wrong-then-valid": (400, "authorization", None),
    "1000-headers": (400, "authorization", None),
}
HEADER_ROUTES = {
    "list-files": ("GET", "/v1/files", {}),
    "upload": (
        "POST",
        "/v1/files",
        {"files": {"file": ("d.jsonl", jsonl(GOOD_LINES))}, "data": {"purpose": "fine-tune"}},
    ),
    "fine-tune": ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama-test", "training_file": "file-x"}}),
    "webhook": ("POST", "/v1/webhook_endpoints", {"json": KINDS["webhook"].valid(None)}),
}


@pytest.fixture(scope="module")
def own_address_client(app):
    """A client from an address of its own, so that the failed-authentication counter these rows fill is theirs."""
    from fastapi.testclient import TestClient

    with TestClient(app, client=(f"198.18.{uuid.uuid4().int % 256}.9", 40000)) as client:
        yield client


@pytest.mark.parametrize("route", list(HEADER_ROUTES))
@pytest.mark.parametrize("abuse", list(HEADERS))
def test_an_abused_authorization_header_is_a_4xx(nothing_stored, own_address_client, abuse, route):
    method, path, body = HEADER_ROUTES[route]
    response = own_address_client.request(method, path, headers=HEADERS[abuse](nothing_stored.key), **body)
    status, param, code = EXPECTED_HEADERS.get(abuse, (401, None, "invalid_api_key"))
    error = assert_refused(response, status, param)
    assert error["code"] == code, error


def test_a_wrong_key_behind_a_valid_one_is_never_checked(app, tenant, monkeypatch):
    """The route checked the first Authorization header and the rate limits counted the last: a guess sent before a
    valid key was counted against that key's allowance, never as a failed authentication, so it never met the
    throttle. Now the pair is a 400 and no key is checked; a guess alone still meets the throttle."""
    from fastapi.testclient import TestClient

    monkeypatch.setattr(get_settings(), "auth_failure_rate_limit", "3/minute")
    with TestClient(app, client=(f"198.18.{uuid.uuid4().int % 256}.10", 40000)) as client:
        assert client.get("/v1/files", headers=tenant.headers).status_code == 200  # the key is now a verified one
        pair = [(b"authorization", b"Bearer sk-guess"), (b"authorization", f"Bearer {tenant.key}".encode())]
        assert [client.get("/v1/files", headers=pair).status_code for _ in range(10)] == [400] * 10
        alone = {"Authorization": "Bearer sk-guess"}
        assert [client.get("/v1/files", headers=alone).status_code for _ in range(4)] == [401, 401, 401, 429]

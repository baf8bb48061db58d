"""Issue 16, "one text template takes down a worker": a format spec or a conversion in a text template.

`"Text: {text:>2000000000}\\nEmotion: {label}"` made a worker pad every example to 2 GB. Every route that takes
a template refuses a `{field:spec}` or a `{field!conversion}` with a 400 naming the template's parameter, at
creation: no job row is written and nothing reaches a worker. The worker's reader refuses them too, for a
job stored before the rule.
"""

from __future__ import annotations

import pytest

from models.datasets import parse_template, read_examples
from models.errors import InvalidRequest
from models.job import Job
from tests.conftest import emotion_rows, write_jsonl
from tests.security.conftest import assert_refused

PLAIN = "{text} -> {label}"
LR = {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}

HOSTILE = [
    pytest.param("Text: {text:>2000000000}\nEmotion: {label}", id="issue-pad-2e9"),
    pytest.param("{text:>10} -> {label}", id="small-pad"),
    pytest.param("{text} -> {label:.3}", id="precision-on-the-last-field"),
    pytest.param("{text:{label}} -> {label}", id="nested-spec"),
    pytest.param("{text!r} -> {label}", id="repr"),
    pytest.param("{text!s} -> {label}", id="str"),
    pytest.param("{text!a} -> {label}", id="ascii"),
    pytest.param("{text!x} -> {label}", id="unknown-conversion"),
    pytest.param("{text!r:>99999999} -> {label}", id="conversion-and-spec"),
    pytest.param("{text}<|completion|> {label:^100000000}", id="spec-after-the-completion-marker"),
]


def _fine_tune(t, template):
    return "/v1/fine_tuning/jobs", {"model": "tiny-llama-test", "training_file": t.training, "text_template": template}


def _follow_up_evaluation(t, template):
    body = {
        "model": "tiny-llama-test",
        "training_file": t.training,
        "validation_file": t.validation,
        "text_template": PLAIN,
        "evaluation": {"text_template": template},
    }
    return "/v1/fine_tuning/jobs", body


def _evaluation(t, template):
    return "/v1/evaluations", {
        "evaluation_file": t.validation,
        "targets": ["tiny-llama-test"],
        "text_template": template,
    }


def _sweep_base(t, template=PLAIN) -> dict:
    return {
        "model": "tiny-llama-test",
        "training_file": t.training,
        "validation_file": t.validation,
        "text_template": template,
        "max_steps": 2,
    }


def _sweep(t, template):
    return "/v1/sweeps", {"fine_tuning": _sweep_base(t, template), "search_space": {"learning_rate": LR}}


def _sweep_objective(t, template):
    objective = {"metric": "accuracy", "evaluation_file": t.validation, "evaluation": {"text_template": template}}
    return "/v1/sweeps", {"fine_tuning": _sweep_base(t), "search_space": {"learning_rate": LR}, "objective": objective}


# Where a template goes, and the parameter its refusal names.
ROUTES = [
    pytest.param(_fine_tune, "text_template", id="fine-tune"),
    pytest.param(_follow_up_evaluation, "evaluation.text_template", id="fine-tune-evaluation"),
    pytest.param(_evaluation, "text_template", id="evaluation"),
    pytest.param(_sweep, "fine_tuning.text_template", id="sweep"),
    pytest.param(_sweep_objective, "objective.evaluation.text_template", id="sweep-objective"),
]


@pytest.mark.parametrize(("request_of", "param"), ROUTES)
@pytest.mark.parametrize("template", HOSTILE)
def test_a_format_spec_or_conversion_is_refused_at_creation(tenant, request_of, param, template):
    path, body = request_of(tenant, template)
    error = assert_refused(tenant.post(path, body), 400, param)
    assert "text_template" in error["message"]
    assert tenant.count(Job) == 0  # no job of any kind was stored, so no worker ever sees the template


@pytest.mark.parametrize("request_of", [p.values[0] for p in ROUTES], ids=[p.id for p in ROUTES])
def test_the_same_routes_take_plain_fields_and_doubled_braces(client, auth, request_of):
    from tests.security.conftest import Tenant

    tenant = Tenant(client)
    path, body = request_of(tenant, "{{literal}} Text: {text}\nEmotion: {label}")
    response = tenant.post(path, body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("template", "parts"),
    [
        ("{text} -> {label}", [("", "text"), (" -> ", "label")]),
        ("{{x}} {text}", [("{", None), ("x}", None), (" ", "text")]),
        ("Text: {text}<|completion|> {label}.", [("Text: ", "text"), ("<|completion|> ", "label"), (".", None)]),
    ],
)
def test_plain_templates_parse(template, parts):
    assert parse_template(template) == parts


NOT_PLAIN = [
    pytest.param("{text.__class__}", id="attribute"),
    pytest.param("{text[0]}", id="index"),
    pytest.param("{text", id="unclosed"),
]


@pytest.mark.parametrize("template", HOSTILE + NOT_PLAIN)
def test_the_workers_reader_refuses_them_too(tmp_path, template):
    """A job stored before the rule (or written to the database by hand) still cannot pad in a worker."""
    path = write_jsonl(tmp_path / "train.jsonl", emotion_rows(3))
    with pytest.raises(InvalidRequest) as caught:
        read_examples(path, template)
    assert caught.value.param == "text_template"

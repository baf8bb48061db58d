"""Issue 16, worker side: a tenant's data cannot hold a worker.

- Cancel reaches data preparation: a job cancelled while its file is read and rendered, or while it is
  tokenized, stops there and ends `cancelled`, as one cancelled between training steps does.
- An example's rendered size is capped (GROVE_MAX_EXAMPLE_CHARS): one over it fails its job as a user error
  naming its line, and the worker never builds the string first.
- A job that runs out of memory while preparing its data fails alone as `out_of_memory`; the worker runs the
  next job.
- The tokenization cache is per project: a job's hit or miss says nothing about another project's files.

Jobs run here with the real worker stage (claim, lease, stage, finish), as a worker process runs them.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from sqlalchemy import select

import models.datasets as datasets
import worker.data
from models.config import get_settings
from models.datasets import read_examples
from models.db import session_scope
from models.errors import InvalidRequest
from models.file import File
from models.job import Job, JobEvent
from tests.conftest import write_jsonl
from tests.security.conftest import Tenant
from worker.fine_tune import STOP_POLL_SECONDS
from worker.tasks import run_job
from worker.token_cache import cache_key, project_cache_dir


def create_job(tenant, **overrides) -> str:
    response = tenant.post("/v1/fine_tuning/jobs", tenant.base(**overrides))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        rows = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
        session.expunge_all()
        return rows


def assert_cancelled_before_training(job_id: str) -> None:
    """Ended as a cancel between steps ends (one cancelling, one cancelled, no result), and trained nothing."""
    job = job_row(job_id)
    assert job.status == "cancelled" and job.result_files in (None, []) and job.error is None
    kinds = [e.type for e in events(job_id)]
    assert kinds.count("cancelling") == 1 and kinds.count("cancelled") == 1, kinds
    assert "metrics" not in kinds and "checkpoint" not in kinds and "succeeded" not in kinds
    assert not any("tokenization_cache" in (e.data or {}) for e in events(job_id))  # on_start never came
    assert not (get_settings().work_dir / job_id).exists()


# --- cancel during data preparation ------------------------------------------------------------------------


def cancel_at(tenant, job_id: str, calls: list, at: int):
    """Called once per example: at the `at`-th, cancel the job through the API, then give the stop check time
    to read it (it reads the job's status at most every STOP_POLL_SECONDS)."""

    def record() -> None:
        calls.append(len(calls))
        if len(calls) == at:
            assert tenant.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", {}).json()["status_detail"] == "cancelling"
            time.sleep(STOP_POLL_SECONDS + 0.2)

    return record


def test_cancel_while_the_file_is_read_and_rendered(tenant, monkeypatch):
    job_id = create_job(tenant, text_template="{text} -> {label} (cancel while reading)")
    calls: list = []
    record = cancel_at(tenant, job_id, calls, at=3)
    real = datasets.render_template

    def render(parts, row):
        record()
        return real(parts, row)

    monkeypatch.setattr(datasets, "render_template", render)
    assert run_job(job_id, "fine_tune") == "done"
    # The example after the cancel was never rendered: the stop check before it raised (24 in the file).
    assert len(calls) == 3
    assert_cancelled_before_training(job_id)


def test_cancel_while_the_examples_are_tokenized(tenant, monkeypatch):
    job_id = create_job(tenant, text_template="{text} -> {label} (cancel while tokenizing)")
    calls: list = []
    record = cancel_at(tenant, job_id, calls, at=3)
    real = worker.data._encode

    def encode(*args):
        record()
        return real(*args)

    monkeypatch.setattr(worker.data, "_encode", encode)
    assert run_job(job_id, "fine_tune") == "done"
    assert len(calls) == 3
    assert_cancelled_before_training(job_id)


# --- the rendered size of one example ----------------------------------------------------------------------

LONG_TEXT = "word " * 1000  # 5,000 characters
REPEATING = "{text}" * 600 + " -> {label}"  # 3,600 characters, within the API's 4,000: 3,000,000 rendered


def long_rows(n: int) -> list[dict]:
    return [{"text": f"{LONG_TEXT}{i}", "label": "joy"} for i in range(n)]


def test_a_template_that_repeats_a_long_field_fails_the_job_as_a_user_error(tenant):
    training = tenant.upload(long_rows(10), "long.jsonl")
    job_id = create_job(tenant, training_file=training, text_template=REPEATING)
    assert run_job(job_id, "fine_tune") == "failed"
    error = job_row(job_id).error
    assert error["type"] == "user_error" and error["code"] == "example_too_large", error
    assert error["param"] == "text_template"
    assert "line 1 of the training_file" in error["message"] and "1,000,000" in error["message"]
    assert not (get_settings().work_dir / job_id).exists()

    # The worker goes on with the next job.
    assert run_job(create_job(tenant, text_template="{text} -> {label} (after a refused one)"), "fine_tune") == "done"


def test_the_giant_example_is_never_built(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", long_rows(3))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest) as caught:
            read_examples(path, REPEATING, max_chars=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "example_too_large" and caught.value.param == "text_template"
    assert f"{600 * len(LONG_TEXT + '0') + len(' -> joy'):,} characters" in caught.value.message
    assert peak < 1_000_000, peak  # the example would take 3 MB; only the file's line and its fields were held


SHORT, LONG = {"text": "x", "label": "joy"}, {"text": "x" * 60, "label": "x" * 60}
CHAT = {"messages": [{"role": "user", "content": "u" * 60}, {"role": "assistant", "content": "a" * 60}]}
MARKED = "{text}<|completion|>{label}"


@pytest.mark.parametrize(
    ("rows", "template", "param", "line"),
    [
        pytest.param(["", {"text": "x" * 200}], "{text}", "training_file", 2, id="a-field-alone"),
        pytest.param([LONG], "{text}{text}", "text_template", 1, id="repeated"),
        pytest.param([SHORT], "{text}" + "y" * 120, "text_template", 1, id="literal"),
        pytest.param([SHORT, "", LONG], MARKED, "text_template", 3, id="prompt-and-completion-together"),
        pytest.param([{"prompt": "p" * 70, "completion": "c" * 40}], None, "training_file", 1, id="prompt-completion"),
        pytest.param([CHAT], None, "training_file", 1, id="chat"),
    ],
)
def test_every_shape_of_example_is_capped(tmp_path, monkeypatch, rows, template, param, line):
    """100 characters at most here; a blank line counts in the line number but holds no example."""
    from worker.data import read_training_examples

    monkeypatch.setenv("GROVE_MAX_EXAMPLE_CHARS", "100")
    get_settings.cache_clear()
    try:
        path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(r) if isinstance(r, dict) else r for r in rows])
        with pytest.raises(InvalidRequest) as caught:
            read_training_examples(path, template, "training_file")
    finally:
        get_settings.cache_clear()
    assert caught.value.code == "example_too_large" and caught.value.param == param
    assert caught.value.message.startswith(f"line {line} of the training_file: ")


def test_examples_within_the_limit_read_as_before(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "n": 3}, {"text": "b", "n": [1, 2]}])
    examples = read_examples(path, "{text}:{n}{n}", max_chars=14)  # the longest, exactly
    assert [e.text for e in examples] == ["a:33", "b:[1, 2][1, 2]"]


# --- out of memory while preparing the data ----------------------------------------------------------------


def test_out_of_memory_in_data_preparation_fails_the_job_alone(tenant, monkeypatch):
    def exhausted(*args):
        bytearray(2**62)  # a real MemoryError, from the allocator

    first = create_job(tenant, text_template="{text} -> {label} (out of memory)")
    with monkeypatch.context() as patch:
        patch.setattr(worker.data, "_encode", exhausted)
        assert run_job(first, "fine_tune") == "failed"
    job = job_row(first)
    assert job.status == "failed"
    assert job.error["code"] == "out_of_memory" and job.error["type"] == "system_error", job.error
    assert "memory" in job.error["message"]
    assert not (get_settings().work_dir / first).exists()

    # Same process, next job: it trains and succeeds.
    second = create_job(tenant, text_template="{text} -> {label} (after out of memory)")
    assert run_job(second, "fine_tune") == "done"
    assert job_row(second).status == "succeeded"


# --- the tokenization cache is per project -----------------------------------------------------------------


def cache_state(tenant, template: str) -> str:
    job_id = create_job(tenant, text_template=template)
    assert run_job(job_id, "fine_tune") == "done"
    (state,) = [e.data["tokenization_cache"] for e in events(job_id) if "tokenization_cache" in (e.data or {})]
    return state


def test_one_project_never_hits_anothers_cache(tenant):
    other = Tenant(tenant.client)  # uploads the very same training and validation files
    with session_scope() as session:
        files = list(session.scalars(select(File).where(File.id.in_([tenant.training, other.training]))))
    assert len(files) == 2 and files[0].sha256 == files[1].sha256

    template = "{text} -> {label} (cache per project)"
    assert cache_state(tenant, template) == "miss"
    assert cache_state(other, template) == "miss"  # it would be "hit" with a shared cache
    assert cache_state(tenant, template) == "hit"
    root = get_settings().work_dir.resolve() / "token-cache"
    assert list((root / tenant.project_id).glob("*.npz")) and list((root / other.project_id).glob("*.npz"))


def test_cache_keys_and_directories_name_the_project(tmp_path):
    def key(project_id: str) -> str:
        return cache_key("ab" * 32, "{text}", "tokenizer", project_id=project_id)

    assert key("proj-A") != key("proj-B") and key("proj-A") == key("proj-A")
    assert project_cache_dir(tmp_path, "proj-A") == tmp_path / "proj-A"
    for hostile in ("", ".", "..", "../proj-B", "a/b"):
        with pytest.raises(ValueError):
            project_cache_dir(tmp_path, hostile)

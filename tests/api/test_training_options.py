"""Grove's training options on the create request: stored as resolved, refused with a 400 naming the field."""

from __future__ import annotations

import sys

import pytest

from models.job import Checkpoint, Job
from models.job_status import JobStatus
from tests.api.test_files import jsonl, upload
from tests.conftest import emotion_rows, prompt_completion_rows


@pytest.fixture
def training_file(client, auth) -> str:
    return upload(client, auth, jsonl(prompt_completion_rows(12))).json()["id"]


@pytest.fixture
def fields_file(client, auth) -> str:
    return upload(client, auth, jsonl(emotion_rows(12))).json()["id"]


def create(client, auth, **body):
    return client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama-test"} | body)


def test_options_are_stored_and_shown_resolved(client, auth, training_file, fields_file):
    response = create(
        client,
        auth,
        training_file=training_file,
        validation_file=training_file,
        adapter={"type": "qlora", "r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        warmup_ratio=0.1,
        weight_decay=0.01,
        max_grad_norm=0.5,
        gradient_checkpointing=True,
        mixed_precision="bf16",
        packing=False,
        group_by_length=True,
        early_stopping_patience=2,
        early_stopping_threshold=0.01,
        result_adapter="last",
        save_every_steps=50,
        keep_checkpoints=5,
        merged_model="bfloat16",
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["adapter"]["type"] == "qlora" and job["adapter"]["modules_to_save"] == ["lm_head"]
    assert job["lr_scheduler"] == "cosine" and job["gradient_accumulation_steps"] == 2
    assert job["early_stopping_patience"] == 2 and job["result_adapter"] == "last"
    assert job["merged_model"] == "bfloat16" and job["packing"] is False
    assert job["max_seq_len"] == 512  # the default, within tiny-llama-test's context

    defaults = create(client, auth, training_file=fields_file, text_template="{text}<|completion|> {label}").json()
    assert defaults["adapter"]["type"] == "lora" and defaults["packing"] is True
    assert defaults["gradient_accumulation_steps"] == "auto" and defaults["mixed_precision"] == "auto"
    assert defaults["lr_scheduler"] == "linear" and defaults["result_adapter"] == "best"
    assert defaults["text_template"] == "{text}<|completion|> {label}"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"adapter": {"r": 32}}, "adapter.r"),  # tiny-llama-test allows 16
        ({"adapter": {"target_modules": ["q_proj", "qkv_proj"]}}, "adapter.target_modules"),
        ({"adapter": {"target_modules": ["input_layernorm"]}}, "adapter.target_modules"),
        ({"adapter": {"modules_to_save": ["classifier"]}}, "adapter.modules_to_save"),
        ({"adapter": {"type": "prefix"}}, "adapter.type"),
        ({"max_steps": 0}, "max_steps"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": "many"}, "gradient_accumulation_steps"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"warmup_ratio": 0.9}, "warmup_ratio"),
        ({"max_grad_norm": -1}, "max_grad_norm"),
        ({"mixed_precision": "int8"}, "mixed_precision"),
        ({"early_stopping_patience": 2}, "early_stopping_patience"),  # no validation file
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"save_every_steps": 0}, "save_every_steps"),
        ({"merged_model": "int4"}, "merged_model"),
        ({"from_job": "ftjob-nope"}, "from_job"),
        ({"from_checkpoint": "ftckpt-nope"}, "from_checkpoint"),
        ({"from_job": "ftjob-a", "from_checkpoint": "ftckpt-b"}, "from_checkpoint"),
    ],
)
def test_bad_options_name_the_field(client, auth, training_file, body, param):
    response = create(client, auth, **({"training_file": training_file} | body))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


@pytest.mark.parametrize(
    "template",
    ["{text}<|completion|> {label}<|completion|>", "{text} {label}<|completion|>  "],
)
def test_completion_marker_misuse(client, auth, fields_file, template):
    response = create(client, auth, training_file=fields_file, text_template=template)
    assert response.status_code == 400 and response.json()["error"]["param"] == "text_template", response.text


def test_qlora_needs_bitsandbytes(client, auth, training_file, monkeypatch):
    # A None entry in sys.modules is how Python marks a module that cannot be imported.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    response = create(client, auth, training_file=training_file, adapter={"type": "qlora"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapter.type"
    assert "bitsandbytes" in response.json()["error"]["message"]
    assert create(client, auth, training_file=training_file, adapter={"type": "lora"}).status_code == 200


def test_full_fine_tune_has_no_rank_limit(client, auth, training_file):
    response = create(client, auth, training_file=training_file, adapter={"type": "full", "r": 256})
    assert response.status_code == 200, response.text


def _finish(job_id: str, with_checkpoint: bool = False) -> str | None:
    """Mark a job succeeded with a (fake) result file, as a worker would have."""
    from models.db import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status = JobStatus.succeeded
        job.result_files = ["file-result"]
        if with_checkpoint:
            checkpoint = Checkpoint(job_id=job_id, step=5, metrics={}, file_id="file-ckpt")
            session.add(checkpoint)
            session.flush()
            return checkpoint.id
    return None


def test_continue_from_a_job_or_checkpoint(client, auth, training_file):
    source = create(
        client, auth, training_file=training_file, adapter={"type": "dora", "r": 4, "target_modules": ["q_proj"]}
    ).json()
    unfinished = create(client, auth, training_file=training_file, from_job=source["id"])
    assert unfinished.status_code == 400 and unfinished.json()["error"]["param"] == "from_job"

    checkpoint_id = _finish(source["id"], with_checkpoint=True)
    continued = create(client, auth, training_file=training_file, from_job=source["id"], adapter={"dropout": 0.1})
    assert continued.status_code == 200, continued.text
    adapter = continued.json()["adapter"]
    assert (adapter["type"], adapter["r"], adapter["target_modules"], adapter["dropout"]) == (
        "dora",
        4,
        ["q_proj"],
        0.1,
    )
    assert continued.json()["from_job"] == source["id"]

    other_rank = create(client, auth, training_file=training_file, from_job=source["id"], adapter={"r": 8})
    assert other_rank.status_code == 400 and other_rank.json()["error"]["param"] == "adapter.r"
    other_type = create(client, auth, training_file=training_file, from_job=source["id"], adapter={"type": "lora"})
    assert other_type.status_code == 400 and other_type.json()["error"]["param"] == "adapter.type"

    from_checkpoint = create(client, auth, training_file=training_file, from_checkpoint=checkpoint_id)
    assert from_checkpoint.status_code == 200 and from_checkpoint.json()["adapter"]["type"] == "dora"

    # Another project sees neither.
    from tests.conftest import new_key

    stranger = {"Authorization": f"Bearer {new_key()}"}
    theirs = upload(client, stranger, jsonl(prompt_completion_rows(12))).json()["id"]
    assert create(client, stranger, training_file=theirs, from_job=source["id"]).status_code == 400
    assert create(client, stranger, training_file=theirs, from_checkpoint=checkpoint_id).status_code == 400

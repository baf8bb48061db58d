"""The `grove` client commands, run with typer's CliRunner against a live server (HTTP only)."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from typer.testing import CliRunner

from api.cli import app
from models.job_status import JobStatus
from models.transitions import switch_job_status
from tests.conftest import emotion_rows, use_database, write_jsonl

runner = CliRunner()


@pytest.fixture
def grove(live, tmp_path, monkeypatch):
    """Run `grove ARGS` as a user configured through the environment (no config file of the machine's)."""
    key = live.new_key()
    monkeypatch.setenv("GROVE_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.chdir(tmp_path)
    env = {"GROVE_BASE_URL": live.base_url, "GROVE_API_KEY": key}

    def run(*args: str):
        return runner.invoke(app, list(args), env=env)

    run.key = key
    return run


def test_upload_validates_locally_with_the_servers_messages(grove, tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)]
    rows[2] = {"prompt": "no completion"}
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)

    local = grove("files", "upload", str(bad))
    assert local.exit_code == 1
    assert "line 3: missing key 'completion'" in local.output

    # The server, given the same file, says the same thing.
    remote = grove("files", "upload", str(bad), "--no-validate")
    assert remote.exit_code == 1
    assert "HTTP 400: line 3: missing key 'completion' (param: file, invalid_file)" in remote.output

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(12)])
    uploaded = grove("files", "upload", str(good), "--json")
    assert uploaded.exit_code == 0, uploaded.output
    obj = json.loads(uploaded.output)
    assert obj["format"] == "prompt_completion" and obj["n_examples"] == 12
    listed = grove("files", "list")
    assert obj["id"] in listed.output and "good.jsonl" in listed.output


def test_finetune_wait_lists_and_downloads_with_resume(grove, live, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", emotion_rows(24))
    result = grove(
        "finetune", "create", "--model", "tiny-llama-test", "--train", str(train),
        "--template", "{text} -> {label}", "--max-steps", "6", "--batch-size", "4", "--log-every", "1",
        "--rank", "4", "--wait",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, live.log("worker.log"))
    assert "uploaded" in result.output and "succeeded" in result.output
    assert "step 6/6" in result.output  # the progress bar's final state
    assert "Training on 24 examples" in result.output  # events are printed above the bar
    assert "auto: bf16 matmuls at this model's shapes ran" in result.output  # why auto chose its precision
    job_id = result.output.split(" succeeded.")[0].split()[-1]
    assert job_id.startswith("ftjob-")

    listed = json.loads(grove("jobs", "list", "--json").output)
    assert listed["data"][0]["id"] == job_id and listed["data"][0]["status"] == "succeeded"
    table = grove("jobs", "list").output
    assert job_id in table and "6/6 (100%)" in table
    job = json.loads(grove("jobs", "get", job_id, "--json").output)
    assert job["adapter"]["r"] == 4
    events = grove("jobs", "events", job_id, "--limit", "100").output
    assert "started" in events and "Step 6/6" in events

    # A whole download, verified against the server's sha256.
    out = tmp_path / "dl"
    out.mkdir()
    first = grove("download", job_id, "-o", str(out))
    assert first.exit_code == 0, first.output
    adapter = out / f"{job_id}-adapter.tar"
    content = adapter.read_bytes()
    meta = httpx.get(
        f"{live.base_url}/v1/files/{job['result_files'][0]}", headers={"Authorization": f"Bearer {grove.key}"}
    ).json()
    assert hashlib.sha256(content).hexdigest() == meta["sha256"] and "verified" in first.output

    # Resume: a .part holding a wrong first half proves only the rest is fetched (Range), and the
    # sha256 check catches it; a .part holding the right first half completes to the right file.
    half = len(content) // 2
    resumed = tmp_path / "resumed.tar"
    part = tmp_path / "resumed.tar.part"
    part.write_bytes(b"\0" * half)
    broken = grove("download", job["result_files"][0], "-o", str(resumed))
    assert broken.exit_code == 1 and "sha256 mismatch" in broken.output
    assert not part.exists() and not resumed.exists()
    part.write_bytes(content[:half])
    fixed = grove("download", job["result_files"][0], "-o", str(resumed))
    assert fixed.exit_code == 0, fixed.output
    assert resumed.read_bytes() == content and not part.exists()
    again = grove("download", job["result_files"][0], "-o", str(resumed))
    assert "already complete" in again.output

    every = grove("download", job_id, "--all", "-o", str(tmp_path / "all"), "--json")
    assert every.exit_code == 0, every.output
    assert len(json.loads(every.output)) == len(job["result_files"])


def test_follow_exits_non_zero_on_cancel_and_failure(grove, client, live, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", emotion_rows(24))
    created = grove(
        "finetune", "create", "-m", "tiny-llama-test", "-t", str(train), "--template", "{text} -> {label}",
        "--max-steps", "5000", "--json",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    job_id = json.loads(created.output)["id"]
    cancelled = grove("jobs", "cancel", job_id)
    assert cancelled.exit_code == 0 and job_id in cancelled.output
    followed = grove("jobs", "events", job_id, "--follow")
    assert followed.exit_code == 3, followed.output
    assert "cancelled" in followed.output

    # A failed job: queued through the in-process API on the live stack's database (no worker consumes the
    # in-process queue), failed by hand.
    auth = {"Authorization": f"Bearer {grove.key}"}
    with use_database(live.database_url), train.open("rb") as f:
        file_id = client.post("/v1/files", headers=auth, files={"file": f}, data={"purpose": "fine-tune"}).json()["id"]
        job = client.post(
            "/v1/fine_tuning/jobs",
            headers=auth,
            json={"model": "tiny-llama-test", "training_file": file_id, "text_template": "{text} -> {label}"},
        ).json()
    with live.session() as session:
        switch_job_status(
            session,
            job["id"],
            JobStatus.failed,
            error={
                "code": "invalid_file",
                "message": "line 7: bad row",
                "param": "training_file",
                "type": "user_error",
            },
        )
    failed = grove("jobs", "events", job["id"], "--follow", "--json")
    assert failed.exit_code == 1
    lines = [json.loads(line) for line in failed.stdout.splitlines()]
    assert [e["event_type"] for e in lines] == ["created", "queued", "failed"]
    human = grove("jobs", "events", job["id"], "--follow")
    assert human.exit_code == 1 and "failed: line 7: bad row (param: training_file)" in human.output


def test_models_and_configuration(grove, live, tmp_path, monkeypatch):
    listed = grove("models", "list", "--json")
    assert "tiny-llama-test" in [m["id"] for m in json.loads(listed.output)["data"]]
    assert "tiny-llama-test" in grove("models", "list").output

    # A config file instead of the environment; a wrong key is a clear error, not a traceback.
    config = tmp_path / "grove.toml"
    monkeypatch.setenv("GROVE_CONFIG", str(config))
    saved = runner.invoke(app, ["configure", "--base-url", live.base_url, "--api-key", grove.key])
    assert saved.exit_code == 0 and (config.stat().st_mode & 0o777) == 0o600
    from_file = runner.invoke(app, ["models", "list", "--json"], env={"GROVE_BASE_URL": None, "GROVE_API_KEY": None})
    assert from_file.exit_code == 0, from_file.output
    shown = runner.invoke(app, ["configure", "--show"], env={"GROVE_BASE_URL": None, "GROVE_API_KEY": None})
    assert "config file" in shown.output and grove.key not in shown.output
    wrong = runner.invoke(app, ["--api-key", "grove-wrong", "models", "list"])
    assert wrong.exit_code == 1 and "HTTP 401" in wrong.output and "Traceback" not in wrong.output

"""Sweeps against real processes: the API (whose reconciler advances sweeps), a Celery worker, PostgreSQL, Redis.

Trials are tiny-llama-test fine-tunes of a few steps; the single worker runs them one at a time, whatever
max_parallel says, which is what a one-worker deployment does.
"""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.conftest import emotion_rows, use_database, write_jsonl
from tests.e2e.helpers import TERMINAL, download, sdk


class Api:
    def __init__(self, live, tmp_path):
        self.live = live
        self.key = live.new_key()
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.client = sdk(live.base_url, self.key)
        self.training = self.upload(tmp_path, emotion_rows(24), "train.jsonl")
        self.validation = self.upload(tmp_path, emotion_rows(10, offset=24), "valid.jsonl")

    def upload(self, tmp_path, rows, name) -> str:
        with write_jsonl(tmp_path / name, rows).open("rb") as f:
            return self.client.files.create(file=f, purpose="fine-tune").id

    def post(self, path: str, body: dict) -> dict:
        response = httpx.post(f"{self.live.base_url}{path}", headers=self.headers, json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.live.base_url}{path}", headers=self.headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def sweep(self, space: dict, fine_tuning: dict | None = None, **fields) -> dict:
        base = {
            "model": "tiny-llama-test",
            "training_file": self.training,
            "validation_file": self.validation,
            "text_template": "{text} -> {label}",
            "max_steps": 4,
            "hyperparameters": {"batch_size": 4},
            "max_seq_len": 64,
        }
        return self.post("/v1/sweeps", {"fine_tuning": base | (fine_tuning or {}), "search_space": space} | fields)

    def wait(self, sweep_id: str, until=lambda s: s["status"] in TERMINAL, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sweep = self.get(f"/v1/sweeps/{sweep_id}")
            if until(sweep):
                return sweep
            time.sleep(0.5)
        raise AssertionError(f"sweep {sweep_id}: condition not reached in {timeout}s; last: {json.dumps(sweep)[:3000]}")

    def events(self, job_path: str) -> list[dict]:
        return self.get(f"{job_path}/events?limit=1000")["data"][::-1]


def test_valid_loss_sweep_runs_its_trials_and_points_at_the_best_adapter(live, tmp_path):
    api = Api(live, tmp_path)
    sweep = api.sweep(
        {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "r": {"type": "int", "low": 2, "high": 8},
        },
        strategy="random",
        num_trials=3,
        max_parallel=2,
    )
    done = api.wait(sweep["id"])
    assert done["status"] == "succeeded", (done, live.log("api.log"))
    trials = done["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2] and {t["state"] for t in trials} == {"complete"}
    for trial in trials:
        job = api.client.fine_tuning.jobs.retrieve(trial["fine_tuning_job"])
        assert job.status == "succeeded"
        assert job.metadata == {"sweep_id": sweep["id"], "sweep_trial": str(trial["number"])}
        assert trial["objective"] == job.model_extra["result"]["best_valid_loss"]
        assert trial["adapter_file"] == job.result_files[0]
        assert job.model_extra["learning_rate"] == trial["params"]["learning_rate"]
        assert job.model_extra["adapter"]["r"] == trial["params"]["r"]
    best = min(trials, key=lambda t: (t["objective"], t["number"]))
    assert done["best_trial"]["number"] == best["number"]
    assert done["result"]["best_trial"]["adapter_file"] == best["adapter_file"]
    assert done["fine_tuned_model"] == best["fine_tuned_model"]
    assert done["progress"] == {"trials_created": 3, "trials_finished": 3, "num_trials": 3, "percent": 100.0}

    # The report: a JSON table, a PNG plot and a CSV, each downloadable; and the best adapter itself.
    report_id, plot_id, csv_id = done["result_files"]
    report = download(live.base_url, api.key, report_id).json()
    assert report["object"] == "sweep.report" and report["best_trial"]["number"] == best["number"]
    assert [(t["number"], t["objective"]) for t in report["trials"]] == [(t["number"], t["objective"]) for t in trials]
    assert api.get(f"/v1/sweeps/{sweep['id']}/report") == report
    assert download(live.base_url, api.key, plot_id).content[:8] == b"\x89PNG\r\n\x1a\n"
    table = download(live.base_url, api.key, csv_id).text.splitlines()
    assert table[0].startswith("number,fine_tuning_job,state,status,objective,learning_rate,r") and len(table) == 4
    assert download(live.base_url, api.key, best["adapter_file"]).status_code == 200

    kinds = [e["event_type"] for e in api.events(f"/v1/sweeps/{sweep['id']}")]
    assert kinds[:3] == ["created", "queued", "started"] and kinds[-1] == "succeeded"
    assert kinds.count("trial") == 6  # created and complete, for each trial


def test_pruning_stops_a_trial_whose_loss_diverges(live, tmp_path):
    """A full fine-tune of the tiny model at learning rate 1.0 sends its loss from 11 to 30-70; the median rule
    (one finished trial to compare with) stops it long before its last step."""
    api = Api(live, tmp_path)
    sweep = api.sweep(
        {"learning_rate": {"type": "categorical", "values": [1e-4, 1.0]}},
        fine_tuning={"adapter": {"type": "full"}, "max_steps": 80, "log_every_steps": 2, "eval_every_steps": 2},
        strategy="grid",
        pruning={"n_startup_trials": 1},
    )
    done = api.wait(sweep["id"])
    assert done["status"] == "succeeded", done
    calm, wild = done["trials"]
    assert calm["state"] == "complete" and calm["params"] == {"learning_rate": 1e-4}
    assert wild["state"] == "pruned" and wild["status"] == "cancelled", wild
    assert wild["intermediate"]["valid_loss"] > 15
    job = api.get(f"/v1/fine_tuning/jobs/{wild['fine_tuning_job']}")
    assert job["progress"]["step"] < 80 and job["result_files"] == []
    assert done["best_trial"]["number"] == 0 and done["result"]["counts"]["pruned"] == 1
    pruned = [e for e in api.events(f"/v1/sweeps/{sweep['id']}") if e["data"].get("state") == "pruned"]
    assert len(pruned) == 1 and "median" in pruned[0]["message"]


def test_cancel_propagates_to_running_and_queued_trials(live, tmp_path):
    api = Api(live, tmp_path)
    sweep = api.sweep(
        {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
        # compile off: a 20,000-step CPU run would compile its layers first (auto), tens of seconds per trial
        # before its first step, and this test is about cancelling, not compiling.
        fine_tuning={"max_steps": 20000, "compile": False},
        strategy="random",
        num_trials=4,
        max_parallel=2,
    )

    def one_trains(s):
        return any(t["status"] == "running" and (t["step"] or 0) > 0 for t in s["trials"])

    try:
        # The session's one live worker may still be finishing earlier tests' jobs: the first trial waits its turn.
        running = api.wait(sweep["id"], until=one_trains, timeout=300)
    except AssertionError:
        # 20,000-step trials left running would hold the shared worker for every later test.
        httpx.post(f"{live.base_url}/v1/sweeps/{sweep['id']}/cancel", headers=api.headers, json={}, timeout=60)
        raise
    assert len(running["trials"]) == 2
    cancelling = api.post(f"/v1/sweeps/{sweep['id']}/cancel", {})
    assert cancelling["status"] == "cancelling"
    assert sorted(t["status"] for t in cancelling["trials"]) == ["cancelled", "cancelling"]
    done = api.wait(sweep["id"], timeout=120)
    assert done["status"] == "cancelled" and len(done["trials"]) == 2
    assert {t["status"] for t in done["trials"]} == {"cancelled"}
    assert {t["state"] for t in done["trials"]} == {"cancelled"}
    assert done["best_trial"] is None and done["result_files"] == []


def test_a_worker_killed_mid_sweep_leaves_every_trial_accounted_for(live, tmp_path):
    from jobs.sweep_spec import SweepSpec
    from worker.sweep import load_study

    api = Api(live, tmp_path)
    sweep = api.sweep(
        {"r": {"type": "categorical", "values": [2, 4]}},
        fine_tuning={"max_steps": 60, "save_every_steps": 10},
        strategy="grid",
        max_parallel=2,
    )

    def deep_in_first(s):
        return any(t["status"] == "running" and (t["step"] or 0) >= 10 for t in s["trials"])

    api.wait(sweep["id"], until=deep_in_first, timeout=300)
    live.stop_worker(signal.SIGKILL)  # the trial's lease stops being renewed; the sweep itself holds none
    live.start_worker()
    done = api.wait(sweep["id"], timeout=300)
    assert done["status"] == "succeeded", (done, live.log("worker.log"))
    assert [t["state"] for t in done["trials"]] == ["complete", "complete"]
    assert sorted(t["params"]["r"] for t in done["trials"]) == [2, 4]
    restarted = 0
    for trial in done["trials"]:
        kinds = [e["event_type"] for e in api.events(f"/v1/fine_tuning/jobs/{trial['fine_tuning_job']}")]
        assert kinds.count("succeeded") == 1
        restarted += kinds.count("started") - 1
    assert restarted >= 1  # the killed trial was requeued and finished by the new worker
    # optuna's study (in the live stack's database) agrees: exactly these two trials, both complete, none left
    # running.
    with_spec = api.get(f"/v1/sweeps/{sweep['id']}")
    spec = SweepSpec.model_validate(
        {k: with_spec[k] for k in ("search_space", "strategy", "num_trials", "max_parallel", "seed", "fine_tuning")}
        | {"parameters": {"r": "adapter.r"}, "direction": "minimize", "objective": {"metric": "valid_loss"}}
    )
    with use_database(live.database_url):
        study = load_study(spec, sweep["id"])
    assert [(t.number, t.state.name) for t in study.get_trials()] == [(0, "COMPLETE"), (1, "COMPLETE")]


def test_embedded_sqlite_sweep_keeps_optuna_in_a_file_beside_the_database(embedded, tmp_path):
    """The embedded deployment (SQLite, SQLite broker): optuna's study goes to grove-optuna.db beside grove.db.
    Its reconciler runs every 30 s; `grove reconcile` passes here move the sweep along sooner."""
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from tests.conftest import REPO

    client = sdk(embedded.base_url, embedded.key)
    headers = {"Authorization": f"Bearer {embedded.key}"}
    files = {}
    for name, rows in (("train", emotion_rows(24)), ("valid", emotion_rows(10, offset=24))):
        with write_jsonl(tmp_path / f"{name}.jsonl", rows).open("rb") as f:
            files[name] = client.files.create(file=f, purpose="fine-tune").id
    body = {
        "fine_tuning": {"model": "tiny-llama-test", "training_file": files["train"], "validation_file": files["valid"],
                        "text_template": "{text} -> {label}", "max_steps": 2, "hyperparameters": {"batch_size": 4}},
        "search_space": {"r": {"type": "categorical", "values": [2, 4]}},
        "strategy": "grid",
        "max_parallel": 2,
    }  # fmt: skip
    sweep = httpx.post(f"{embedded.base_url}/v1/sweeps", headers=headers, json=body, timeout=60).json()
    grove = Path(sys.executable).parent / "grove"
    deadline = time.monotonic() + 180
    while True:
        subprocess.run([str(grove), "reconcile"], cwd=REPO, env=embedded.env, check=True, capture_output=True)
        state = httpx.get(f"{embedded.base_url}/v1/sweeps/{sweep['id']}", headers=headers, timeout=60).json()
        if state["status"] in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert state["status"] == "succeeded", (state, embedded.log("api.log"), embedded.log("worker.log"))
    assert [t["state"] for t in state["trials"]] == ["complete", "complete"]

    database = Path(make_url(embedded.env["GROVE_DATABASE_URL"]).database)
    beside = database.with_name("grove-optuna.db")
    with sqlite3.connect(beside) as optuna_db, sqlite3.connect(database) as ours:
        assert optuna_db.execute("select count(*) from trials").fetchone() == (2,)
        tables = {row[0] for row in ours.execute("select name from sqlite_master where type = 'table'")}
    assert "jobs" in tables and not ({"studies", "trials", "version_info"} & tables)

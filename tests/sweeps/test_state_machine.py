"""The reconciler's side of a sweep, driven pass by pass in-process: what each strategy samples, the optuna
study's place in the database, cancel. Trials go to the in-process queue, which no worker consumes; the
tests that need a trial to train run it here with the real worker stage."""

from __future__ import annotations

import itertools
import math

from models.db import session_scope
from models.job import Job
from worker.sweep import advance


def trial_jobs(tenant, sweep_id: str) -> list[dict]:
    sweep = tenant.get(f"/v1/sweeps/{sweep_id}").json()
    return [tenant.get(f"/v1/fine_tuning/jobs/{t['fine_tuning_job']}").json() for t in sweep["trials"]]


def run_trial(job_id: str) -> None:
    """Train a trial here, as a worker would (claim, stage, finish)."""
    from worker.tasks import run_job

    assert run_job(job_id, "fine_tune") == "done"


def test_grid_enumerates_exactly_the_grid_in_order(tenant):
    lrs = [1e-4, 1e-3, 1e-2]
    sweep = tenant.create(
        {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "grid_points": 3},
            "r": {"type": "categorical", "values": [4, 8]},
        },
        strategy="grid",
        max_parallel=6,
    )
    assert sweep["num_trials"] == 6
    advance(sweep["id"])
    advance(sweep["id"])  # nothing more to ask for
    state = tenant.get(f"/v1/sweeps/{sweep['id']}").json()
    assert state["status"] == "running" and len(state["trials"]) == 6
    expected = list(itertools.product(lrs, [4, 8]))
    for trial, (lr, r) in zip(state["trials"], expected, strict=True):
        assert math.isclose(trial["params"]["learning_rate"], lr) and trial["params"]["r"] == r, trial
        assert trial["state"] == "running" and trial["status"] == "queued"
    jobs = trial_jobs(tenant, sweep["id"])
    got = sorted((job["learning_rate"], job["adapter"]["r"]) for job in jobs)
    pairs = zip(got, sorted(expected), strict=True)
    assert all(math.isclose(a, b) and c == d for (a, c), (b, d) in pairs)
    # Each trial is an ordinary fine-tuning job of the sweep: same base request, tagged with its trial number.
    for number, job in enumerate(jobs):
        assert job["metadata"] == {"sweep_id": sweep["id"], "sweep_trial": str(number)}
        assert job["training_file"] == tenant.training and job["max_steps"] == 2
    with session_scope() as session:
        parents = {session.get(Job, job["id"]).parent_id for job in jobs}
    assert parents == {sweep["id"]}
    events = tenant.get(f"/v1/sweeps/{sweep['id']}/events?limit=100").json()["data"]
    assert sum(e["event_type"] == "trial" for e in events) == 6
    assert sum(e["event_type"] == "started" for e in events) == 1


def test_random_respects_bounds_types_and_log_scale(tenant):
    sweep = tenant.create(
        {
            "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "dropout": {"type": "float", "low": 0.0, "high": 0.3},
            "r": {"type": "int", "low": 2, "high": 16, "log": True},
            "batch_size": {"type": "categorical", "values": [2, 4]},
        },
        strategy="random",
        num_trials=40,
        max_parallel=40,
        seed=7,
    )
    advance(sweep["id"])
    trials = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"]
    assert len(trials) == 40
    lrs = [t["params"]["learning_rate"] for t in trials]
    drops = [t["params"]["dropout"] for t in trials]
    ranks = [t["params"]["r"] for t in trials]
    assert all(1e-6 <= v <= 1e-2 for v in lrs) and all(0.0 <= v <= 0.3 for v in drops)
    assert all(isinstance(v, int) and 2 <= v <= 16 for v in ranks)
    assert {t["params"]["batch_size"] for t in trials} == {2, 4}
    # Log scale: half the draws fall below the geometric middle (1e-4), where a linear draw would put 1%.
    assert 10 <= sum(v < 1e-4 for v in lrs) <= 30
    assert sum(v < 1e-5 for v in lrs) >= 3
    # Linear scale: half the draws below the arithmetic middle.
    assert 10 <= sum(v < 0.15 for v in drops) <= 30
    # The draws went into the jobs.
    jobs = {j["id"]: j for j in trial_jobs(tenant, sweep["id"])}
    for t in trials:
        job = jobs[t["fine_tuning_job"]]
        assert job["learning_rate"] == t["params"]["learning_rate"]
        assert job["adapter"]["r"] == t["params"]["r"] and job["adapter"]["dropout"] == t["params"]["dropout"]
        assert job["hyperparameters"]["batch_size"] == t["params"]["batch_size"]


def test_tpe_models_finished_trials_within_bounds(tenant):
    space = {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
        "r": {"type": "int", "low": 2, "high": 8},
    }
    sweep = tenant.create(space, strategy="tpe", num_trials=5, max_parallel=3, tpe_startup_trials=2)
    advance(sweep["id"])
    first = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"]
    assert len(first) == 3
    for trial in first[:2]:
        run_trial(trial["fine_tuning_job"])
    advance(sweep["id"])  # reports the two, asks for two more (TPE now, past its 2 random startup trials)
    state = tenant.get(f"/v1/sweeps/{sweep['id']}").json()
    assert [t["state"] for t in state["trials"]] == ["complete", "complete", "running", "running", "running"]
    for trial in state["trials"]:
        assert 1e-5 <= trial["params"]["learning_rate"] <= 1e-1 and 2 <= trial["params"]["r"] <= 8
        assert isinstance(trial["params"]["r"], int)
    done = [t for t in state["trials"] if t["state"] == "complete"]
    for trial in done:
        job = tenant.get(f"/v1/fine_tuning/jobs/{trial['fine_tuning_job']}").json()
        assert trial["objective"] == job["result"]["best_valid_loss"]
        assert trial["adapter_file"] == job["result_files"][0]
    best = min(done, key=lambda t: t["objective"])
    assert state["best_trial"]["number"] == best["number"]
    assert state["progress"] == {"trials_created": 5, "trials_finished": 2, "num_trials": 5, "percent": 40.0}


def test_optuna_keeps_its_tables_out_of_ours(tenant, database):
    """The study lives in the `optuna` schema; our alembic-managed schema stays exactly what migrations made."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect

    from tests.conftest import REPO

    sweep = tenant.create({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}, num_trials=1)
    advance(sweep["id"])
    engine = create_engine(database)
    try:
        inspector = inspect(engine)
        ours = set(inspector.get_table_names())
        theirs = set(inspector.get_table_names(schema="optuna"))
    finally:
        engine.dispose()
    assert {"studies", "trials", "trial_intermediate_values"} <= theirs and "alembic_version" in theirs
    assert not ({"studies", "trials", "version_info"} & ours)
    config = Config(str(REPO / "alembic.ini"))
    config.attributes["database_url"] = database
    config.attributes["configure_logging"] = False
    command.check(config)


def test_cancel_cancels_queued_and_running_trials(tenant):
    from worker import fine_tune
    from worker.lease import claim

    sweep = tenant.create(
        {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
        strategy="random",
        num_trials=4,
        max_parallel=3,
        fine_tuning={"max_steps": 100000},
    )
    advance(sweep["id"])
    trials = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"]
    assert len(trials) == 3
    lease = claim(trials[0]["fine_tuning_job"])  # a worker took the first one
    assert lease is not None

    cancelling = tenant.post(f"/v1/sweeps/{sweep['id']}/cancel", {}).json()
    assert cancelling["status"] == "cancelling"
    statuses = [t["status"] for t in cancelling["trials"]]
    assert statuses == ["cancelling", "cancelled", "cancelled"]
    advance(sweep["id"])
    assert tenant.get(f"/v1/sweeps/{sweep['id']}").json()["status"] == "cancelling"  # the running trial still stops

    lease.start()
    try:
        fine_tune.run(trials[0]["fine_tuning_job"], lease)  # the worker sees the cancel and stops
    finally:
        lease.stop()
    advance(sweep["id"])
    done = tenant.get(f"/v1/sweeps/{sweep['id']}").json()
    assert done["status"] == "cancelled" and len(done["trials"]) == 3
    assert [t["status"] for t in done["trials"]] == ["cancelled"] * 3
    assert [t["state"] for t in done["trials"]] == ["cancelled"] * 3
    kinds = [e["event_type"] for e in tenant.get(f"/v1/sweeps/{sweep['id']}/events?limit=100").json()["data"]]
    assert kinds.count("cancelling") == 1 and kinds.count("cancelled") == 1


def test_an_optuna_trial_left_without_its_job_is_given_one(tenant):
    """A pass that asked optuna for a trial and then died before its own commit leaves an optuna trial with
    no fine-tuning job; the next pass creates the job for it, with the parameters optuna drew."""
    from jobs.sweep_spec import SweepSpec
    from worker.sweep import distributions, load_study

    sweep = tenant.create(
        {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}, strategy="random", num_trials=2
    )
    advance(sweep["id"])
    with session_scope() as session:
        spec = SweepSpec.model_validate(session.get(Job, sweep["id"]).spec)
    orphan = load_study(spec, sweep["id"]).ask(distributions(spec))  # ... and the pass died here
    advance(sweep["id"])
    trials = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"]
    assert [t["number"] for t in trials] == [0, 1]
    assert trials[1]["params"] == orphan.params
    job = tenant.get(f"/v1/fine_tuning/jobs/{trials[1]['fine_tuning_job']}").json()
    assert job["learning_rate"] == orphan.params["learning_rate"]
    advance(sweep["id"])
    assert len(load_study(spec, sweep["id"]).get_trials()) == 2  # num_trials reached: nothing more asked


def test_an_evaluation_metric_objective_scores_each_trial_with_an_evaluation_job(tenant):
    from tests.conftest import emotion_rows

    scored = tenant.upload(emotion_rows(30, offset=100), "scored.jsonl")
    sweep = tenant.create(
        {"r": {"type": "categorical", "values": [2, 4]}},
        strategy="grid",
        objective={
            "metric": "accuracy",
            "evaluation_file": scored,
            "evaluation": {"generation": {"max_new_tokens": 4}, "max_examples": 8},
        },
    )
    assert sweep["objective"]["direction"] == "maximize"
    assert sweep["objective"]["evaluation"]["metrics"] == ["accuracy"]
    assert sweep["objective"]["evaluation"]["text_template"] == "{text} -> {label}"  # the fine-tune's
    advance(sweep["id"])
    first = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"][0]
    run_trial(first["fine_tuning_job"])
    advance(sweep["id"])  # the trial trained: its evaluation job is queued
    state = tenant.get(f"/v1/sweeps/{sweep['id']}").json()
    evaluating = state["trials"][0]
    assert evaluating["state"] == "evaluating" and evaluating["evaluation_job"], evaluating
    evaluation = tenant.get(f"/v1/evaluations/{evaluating['evaluation_job']}").json()
    assert evaluation["parent_id"] == first["fine_tuning_job"] and evaluation["evaluation_file"] == scored
    assert evaluation["targets"][0]["job_id"] == first["fine_tuning_job"]

    from worker.tasks import run_job

    assert run_job(evaluation["id"], "evaluation") == "done"
    advance(sweep["id"])
    trial = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"][0]
    evaluation = tenant.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert evaluation["status"] == "succeeded"
    assert trial["state"] == "complete"
    assert trial["objective"] == evaluation["result"]["targets"][0]["metrics"]["accuracy"]


def test_a_trial_cannot_be_paused(tenant):
    sweep = tenant.create({"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}, strategy="random")
    advance(sweep["id"])
    trial = tenant.get(f"/v1/sweeps/{sweep['id']}").json()["trials"][0]["fine_tuning_job"]
    response = tenant.post(f"/v1/fine_tuning/jobs/{trial}/pause", {})
    assert response.status_code == 409
    message = response.json()["error"]["message"]
    assert trial in message and sweep["id"] in message and "cannot be paused" in message
    assert tenant.get(f"/v1/fine_tuning/jobs/{trial}").json()["status"] == "queued"
    tenant.post(f"/v1/sweeps/{sweep['id']}/cancel", {})

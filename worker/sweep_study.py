"""A sweep's optuna study: where it is stored, how its trials are sampled and pruned, through optuna's public API.

The study (sampler state, trials, values) lives in optuna's RDB storage on the service's own database server,
isolated from our alembic-managed tables: a PostgreSQL schema `optuna` (optuna creates its tables and stamps its
own alembic version there), or, on SQLite, a file beside the database. The study is named after the sweep.

optuna is imported on first use: it takes most of a second, and a reconciler pass with no sweep to advance
never needs it.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from jobs.sweep_spec import SweepSpec, grid_values
from models.config import get_settings
from models.db import get_engine

OPTUNA_SCHEMA = "optuna"


def optuna_storage_url(database_url: str) -> tuple[str, dict]:
    """Where optuna keeps its studies, and the engine options that keep it apart from our tables."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database
        if not database or database == ":memory:":
            return "sqlite:///:memory:", {}
        path = Path(database)
        beside = path.with_name(f"{path.stem}-optuna{path.suffix or '.db'}")
        return url.set(database=str(beside)).render_as_string(hide_password=False), {"connect_args": {"timeout": 30}}
    kwargs: dict = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}
    if url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"options": f"-csearch_path={OPTUNA_SCHEMA}"}
    return url.render_as_string(hide_password=False), kwargs


_storages: dict[str, Any] = {}
_storage_lock = threading.Lock()


def study_storage():
    """optuna's RDBStorage for this service's database (one per process)."""
    database_url = get_settings().database_url
    with _storage_lock:
        if database_url in _storages:
            return _storages[database_url]
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url, kwargs = optuna_storage_url(database_url)
        if make_url(database_url).get_backend_name() == "postgresql":
            with get_engine().connect() as connection:
                # Two processes may race here; the loser's error is harmless (the schema exists).
                try:
                    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{OPTUNA_SCHEMA}"'))
                    connection.commit()
                except Exception:
                    connection.rollback()
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        _storages[database_url] = storage
        return storage


def _grid_sampler(space: dict[str, list], seed: int):
    import optuna

    class OrderedGridSampler(optuna.samplers.GridSampler):
        """optuna's GridSampler, taking the grid in the order given (first parameter slowest) instead of a
        shuffled order, and never stopping a study: a sweep counts its own trials (GridSampler's after_trial
        calls study.stop(), which only an optimize() loop accepts).

        GridSampler still chooses each trial's grid point and records it on the trial as the system attribute
        `grid_id` (trial n takes point n while n is inside the grid); only the values a point stands for are
        read from the grid in the order given."""

        def __init__(self, search_space: dict[str, list], seed: int | None = None):
            super().__init__(search_space, seed)
            self.names_in_order = list(search_space)
            self.grid_in_order = list(itertools.product(*search_space.values()))

        def sample_independent(self, study, trial, param_name, param_distribution):
            grid_id = trial.system_attrs.get("grid_id")
            if grid_id is None or param_name not in self.names_in_order:
                # GridSampler raises the error that fits (a trial it did not place, a name not in the grid).
                return super().sample_independent(study, trial, param_name, param_distribution)
            return self.grid_in_order[grid_id][self.names_in_order.index(param_name)]

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return OrderedGridSampler(space, seed)


def sampler(spec: SweepSpec, n_trials: int):
    """A fresh sampler for this pass. Samplers hold a random state; seeding it with the number of trials so far
    gives every pass (in any process) the same draws a single long-lived sampler would not repeat."""
    import optuna

    if spec.strategy == "grid":
        return _grid_sampler({name: grid_values(name, p) for name, p in spec.search_space.items()}, spec.seed)
    seed = spec.seed + n_trials
    if spec.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials)


def _pruner(spec: SweepSpec):
    import optuna

    if spec.pruning is None:
        return optuna.pruners.NopPruner()
    p = spec.pruning
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials,
        n_warmup_steps=p.n_warmup_steps,
        interval_steps=p.interval_steps,
        n_min_trials=p.n_min_trials,
    )


def distributions(spec: SweepSpec) -> dict:
    import optuna.distributions as d

    out = {}
    for name, p in spec.search_space.items():
        if p.type == "categorical":
            out[name] = d.CategoricalDistribution(p.values)
        elif p.type == "int":
            out[name] = d.IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[name] = d.FloatDistribution(p.low, p.high, log=p.log, step=p.step)
    return out


def load_study(spec: SweepSpec, sweep_id: str):
    """The sweep's optuna study (named after the sweep), created on its first pass."""
    import optuna

    storage = study_storage()
    try:
        study = optuna.load_study(study_name=sweep_id, storage=storage, pruner=_pruner(spec))
    except KeyError:
        study = optuna.create_study(
            storage=storage, study_name=sweep_id, direction=spec.direction, pruner=_pruner(spec), load_if_exists=True
        )
    study.sampler = sampler(spec, len(study.get_trials(deepcopy=False)))
    return study


def running_trial(study, number: int):
    """The optuna Trial behind trial `number` of a study from `load_study`, to report intermediate values to and
    ask whether to prune; optuna finds trials by id, so the id is looked up from the study's name and the
    trial's number."""
    from optuna.trial import Trial

    storage = study_storage()
    study_id = storage.get_study_id_from_name(study.study_name)
    return Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def best_trial(trials, sign: float):
    """The best complete trial (the lowest number among equals), or None; `sign` is -1 when maximizing."""
    from optuna.trial import TrialState

    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return None
    key = (lambda t: (t.value, t.number)) if sign > 0 else (lambda t: (-t.value, t.number))
    return min(complete, key=key)

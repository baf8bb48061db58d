"""Hyperparameter sweep specs (versioned, stored as JSON on the sweep job) and the search space's rules.

A sweep is a job of kind `sweep` whose trials are child fine-tuning jobs (`parent_id` = the sweep). Its
spec holds the base fine-tuning request, the search space, the strategy and the objective; the reconciler
(worker/sweep.py) samples trials with optuna and creates the child jobs. This module has no optuna import:
it says which parameters may be searched, how a parameter's values lie (bounds, log scale, grid), and how a
trial's values are written into the base request.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from jobs.evaluation_spec import METRICS, EvaluationSettings
from jobs.fine_tune_spec import AdapterConfig, CreateFineTuningJob, Hyperparameters, TrainingOptions
from models.errors import InvalidRequest
from models.request_body import RequestBody

RESULTS_PURPOSE = "sweep-results"
# Child job metadata keys that tie a trial (and its evaluation) to its sweep.
SWEEP_META = "sweep_id"
TRIAL_META = "sweep_trial"

VALID_LOSS = "valid_loss"
# valid_loss, or any metric an evaluation job computes.
Objective = Literal[(VALID_LOSS, *METRICS)]  # type: ignore[valid-type]
MINIMIZED = frozenset({VALID_LOSS, "loss", "perplexity"})

MAX_GRID_SIZE = 10_000
DEFAULT_RANDOM_TRIALS = 10

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr | None

# Options that are not hyperparameters: output and bookkeeping settings, or what an adapter continues from.
NOT_SEARCHABLE = frozenset(
    {
        "text_template",
        "from_job",
        "from_checkpoint",
        "merged_model",
        "log_every_steps",
        "eval_every_steps",
        "save_every_steps",
        "keep_checkpoints",
        "result_adapter",
        "target_modules",
        "modules_to_save",
    }
)


def _kinds(annotation: Any) -> tuple[set[str], list]:
    """The scalar kinds a field accepts ("int", "float", "bool", "str") and its literal values."""
    kinds: set[str] = set()
    literals: list = []
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            sub_kinds, sub_literals = _kinds(arg)
            kinds |= sub_kinds
            literals += sub_literals
        return kinds, literals
    if origin is Literal:
        return set(), list(typing.get_args(annotation))
    if annotation is bool:
        kinds.add("bool")
    elif annotation is int:
        kinds.add("int")
    elif annotation is float:
        kinds.add("float")
    return kinds, literals


def _searchable() -> dict[str, tuple[set[str], list]]:
    fields: dict[str, tuple[set[str], list]] = {}
    groups = [("", TrainingOptions), ("adapter.", AdapterConfig), ("hyperparameters.", Hyperparameters)]
    for prefix, model in groups:
        for name, info in model.model_fields.items():
            if name in NOT_SEARCHABLE or name == "adapter":
                continue
            kinds, literals = _kinds(info.annotation)
            if kinds or literals:
                fields[prefix + name] = (kinds, literals)
    fields["seed"] = ({"int"}, [])
    return fields


# Canonical path ("adapter.r", "hyperparameters.batch_size", "learning_rate") -> (kinds, literal values).
SEARCHABLE = _searchable()
# Short names: the leaves of adapter and hyperparameters (r, alpha, batch_size, ...) and lora_r-style names.
ALIASES = {
    **{path.split(".", 1)[1]: path for path in SEARCHABLE if "." in path and path != "adapter.type"},
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "adapter_type": "adapter.type",
}


def loc_param(loc: tuple) -> str:
    """A pydantic error location as a request field path: ("adapter", "r") -> "adapter.r" (union tags dropped)."""
    parts = [p for p in loc if isinstance(p, str) and p.isidentifier() and p not in _UNION_TAGS]
    return ".".join(parts)


_UNION_TAGS = frozenset({"int", "float", "str", "bool", "list", "dict", "none"})


def canonical_path(name: str) -> str | None:
    if name in SEARCHABLE:
        return name
    return ALIASES.get(name)


class SearchParameter(BaseModel):
    """One searched parameter: a float or int range, or a list of values."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["float", "int", "categorical"] = Field(
        description="float: a real range [low, high]; int: an integer range; categorical: one of `values`."
    )
    low: float | None = Field(None, description="float and int: the smallest value (inclusive).")
    high: float | None = Field(None, description="float and int: the largest value (inclusive).")
    log: bool = Field(False, description="float and int: sample uniformly in log space (low must be > 0).")
    step: float | None = Field(
        None, gt=0, description="float and int: values are low, low+step, ... (int default 1). Not with log floats."
    )
    values: list[Scalar] | None = Field(
        None, max_length=1000, description="categorical: the values to choose from (numbers, strings, booleans)."
    )
    grid_points: int | None = Field(
        None,
        ge=2,
        le=1000,
        description="strategy grid: how many evenly spaced values of a float or int range to try (log-spaced with "
        "log), ends included. A float range needs grid_points or step; an int range defaults to every step.",
    )


class SweepObjective(BaseModel):
    """What a trial is scored by."""

    model_config = ConfigDict(extra="forbid")

    metric: Objective = Field(
        VALID_LOSS,
        description="valid_loss: the validation loss of the trial's published adapter (needs a validation_file). "
        "Any evaluation metric (loss, perplexity, token_accuracy, exact_match, accuracy, rouge_l, bleu): an "
        "evaluation job scores each trial's adapter on evaluation_file.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize for valid_loss, loss and perplexity, maximize for the others."
    )
    evaluation_file: str | None = Field(None, description="Evaluation metrics: the file the trials are scored on.")
    evaluation: EvaluationSettings | None = Field(
        None,
        description="Evaluation metrics: the evaluation job's settings (text_template, labels, generation, "
        "max_examples, ...). `metric` is always among its metrics. text_template defaults to the fine-tune's.",
    )

    @property
    def resolved_direction(self) -> str:
        return self.direction or ("minimize" if self.metric in MINIMIZED else "maximize")

    @property
    def uses_evaluation(self) -> bool:
        return self.metric != VALID_LOSS


class PruningSettings(BaseModel):
    """Stop trials whose intermediate validation loss is clearly worse than the others' (median rule)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["median"] = Field(
        "median",
        description="median: stop a trial whose validation loss at a step is worse than the median of the "
        "completed trials' at the same step (optuna MedianPruner).",
    )
    n_startup_trials: int = Field(2, ge=0, le=1000, description="Completed trials before any trial is pruned.")
    n_warmup_steps: int = Field(0, ge=0, description="Steps a trial runs before it may be pruned.")
    interval_steps: int = Field(1, ge=1, description="Judge a trial every this many steps.")
    n_min_trials: int = Field(
        1, ge=1, description="Trials that must have reported a value at a step before that step is judged."
    )


class SweepSettings(BaseModel):
    """The sweep request, apart from the base fine-tuning request. Version 1."""

    model_config = ConfigDict(extra="forbid")

    search_space: dict[str, SearchParameter] = Field(
        min_length=1,
        max_length=16,
        description="Parameter name -> range or values. Names are fine-tuning request fields: learning_rate, "
        "adapter.r (or r), adapter.alpha, adapter.dropout, adapter.type, hyperparameters.batch_size (or "
        "batch_size), n_epochs, max_steps, lr_scheduler, warmup_ratio, weight_decay, seed, ...",
    )
    strategy: Literal["grid", "random", "tpe"] = Field(
        "tpe",
        description="grid: every combination (optuna GridSampler, in the order given); random: independent "
        "uniform draws (RandomSampler); tpe: Tree-structured Parzen Estimator (TPESampler).",
    )
    num_trials: int | None = Field(
        None, ge=1, le=10_000, description=f"Trials to run. Default: the grid's size, else {DEFAULT_RANDOM_TRIALS}."
    )
    max_parallel: int = Field(1, ge=1, le=256, description="Trials running at once (each on its own worker).")
    objective: SweepObjective = Field(default_factory=SweepObjective)
    pruning: PruningSettings | None = Field(None, description="Median-rule pruning of unpromising trials; off if null.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the sampler.")
    tpe_startup_trials: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="tpe: trials sampled at random before TPE models the results. Default: a third of num_trials, "
        "between 2 and 10.",
    )


class SweepSpec(SweepSettings):
    """Everything the reconciler needs to run a sweep. Version 1."""

    version: Literal[1] = Field(1, description="Schema version of this spec.")
    fine_tuning: dict = Field(description="The base fine-tuning request (fields as sent), trials override it.")
    parameters: dict[str, str] = Field(description="Search-space name -> canonical request path.")
    num_trials: int = Field(ge=1, description="Trials to run (resolved).")
    direction: Literal["minimize", "maximize"] = Field(description="The objective's direction (resolved).")

    @property
    def startup_trials(self) -> int:
        if self.tpe_startup_trials is not None:
            return self.tpe_startup_trials
        return min(10, max(2, self.num_trials // 3))


# --- the search space's rules -------------------------------------------------------------------------------


class CreateSweep(SweepSettings, RequestBody):
    fine_tuning: CreateFineTuningJob = Field(
        description="The base fine-tuning request (the body of POST /v1/fine_tuning/jobs); each trial is this "
        "request with the searched parameters set."
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _bad(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"search_space.{name}: {message}", param=f"search_space.{name}")


def check_parameter(name: str, p: SearchParameter) -> str:
    """Refuse a parameter that is unknown or whose range is empty or ill-formed; return its request path."""
    path = canonical_path(name)
    if path is None:
        raise _bad(
            name,
            f"unknown parameter {name!r}. Searchable: {', '.join(sorted(SEARCHABLE))} (or the short names "
            f"{', '.join(sorted(ALIASES))}).",
        )
    kinds, literals = SEARCHABLE[path]
    if p.type == "categorical":
        if not p.values:
            raise _bad(name, "a categorical parameter needs at least one value in `values`.")
        seen: list = []
        for value in p.values:
            if any(v == value and type(v) is type(value) for v in seen):
                raise _bad(name, f"value {value!r} is listed twice.")
            seen.append(value)
        for field in ("low", "high", "step", "grid_points"):
            if getattr(p, field) is not None:
                raise _bad(name, f"`{field}` applies to float and int parameters, not categorical ones.")
        return path
    if p.values is not None:
        raise _bad(name, f"`values` applies to categorical parameters; a {p.type} parameter has low and high.")
    if p.low is None or p.high is None:
        raise _bad(name, f"a {p.type} parameter needs both `low` and `high`.")
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        raise _bad(name, "low and high must be finite numbers.")
    if p.low > p.high:
        raise _bad(name, f"low ({p.low:g}) is greater than high ({p.high:g}).")
    if p.log and p.low <= 0:
        raise _bad(name, f"a log-scale range needs low > 0 (got {p.low:g}).")
    if p.type == "int":
        if "int" not in kinds and "float" not in kinds:
            raise _bad(name, f"{path} is not a number; search it as a categorical parameter.")
        for field in ("low", "high", "step"):
            value = getattr(p, field)
            if value is not None and value != int(value):
                raise _bad(name, f"`{field}` of an int parameter must be a whole number (got {value:g}).")
        if p.log and p.step not in (None, 1):
            raise _bad(name, "a log-scale int parameter cannot have a step other than 1.")
    else:
        if "float" not in kinds:
            what, use = ("an integer", "an int") if "int" in kinds else ("not a number", "a categorical")
            raise _bad(name, f"{path} is {what}; search it as {use} parameter.")
        if p.log and p.step is not None:
            raise _bad(name, "a log-scale float parameter cannot have a step.")
    return path


def grid_values(name: str, p: SearchParameter) -> list:
    """The values strategy grid tries for this parameter, in order."""
    if p.type == "categorical":
        return list(p.values or [])
    low, high = p.low, p.high
    if p.grid_points is not None:
        n = p.grid_points
        if p.log:
            points = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (n - 1)) for i in range(n)]
        else:
            points = [low + (high - low) * i / (n - 1) for i in range(n)]
        points[0], points[-1] = low, high
        if p.type == "int":
            return sorted({min(max(round(v), int(low)), int(high)) for v in points})
        return [float(f"{v:.10g}") if low < float(f"{v:.10g}") < high else v for v in points]
    if p.type == "int":
        step = int(p.step or 1)
        values = list(range(int(low), int(high) + 1, step))
    elif p.step is not None:
        count = int(math.floor((high - low) / p.step + 1e-9)) + 1
        values = [float(f"{low + i * p.step:.10g}") for i in range(count)]
    else:
        raise _bad(name, "strategy grid needs `grid_points` (or `step`) for a float range.")
    if len(values) > MAX_GRID_SIZE:
        raise _bad(name, f"the grid would hold {len(values)} values; use grid_points or a larger step.")
    return values


def first_values(space: dict[str, SearchParameter], strategy: str) -> dict[str, list]:
    """Per parameter, the values that stand for its whole range when checking a space: its ends or its values."""
    out = {}
    for name, p in space.items():
        if p.type == "categorical":
            out[name] = list(p.values or [])
        elif strategy == "grid":
            values = grid_values(name, p)
            out[name] = [values[0], values[-1]] if len(values) > 1 else values
        else:
            low = int(p.low) if p.type == "int" else p.low
            high = int(p.high) if p.type == "int" else p.high
            out[name] = [low, high] if low != high else [low]
    return out


def apply_params(base: dict, parameters: dict[str, str], values: dict[str, Any]) -> dict:
    """The base fine-tuning request (as sent) with the trial's values written at their paths."""
    request = copy.deepcopy(base)
    for name, value in values.items():
        path = parameters[name]
        if path.startswith("hyperparameters."):
            method = request.get("method") or {}
            supervised = method.get("supervised") if isinstance(method, dict) else None
            if isinstance(supervised, dict):
                target = supervised.setdefault("hyperparameters", {}) or {}
                supervised["hyperparameters"] = target
            else:
                target = request.get("hyperparameters") or {}
                request["hyperparameters"] = target
        elif path.startswith("adapter."):
            target = request.get("adapter") or {}
            request["adapter"] = target
        else:
            target = request
        target[path.rsplit(".", 1)[-1]] = value
    return request

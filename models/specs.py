"""Versioned job specs, stored as JSON on the job row.

The API builds a spec from the request once, at creation; the worker reads it back with
`FineTuneSpec.model_validate(job.spec)`. A new field needs a default so that old rows still load.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

AUTO = "auto"


class AdapterConfig(BaseModel):
    """Which weights train, and how."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["lora", "dora"] = Field(
        "lora",
        description="lora: low-rank adapter; dora: weight-decomposed low-rank adapter (peft use_dora).",
    )
    r: int = Field(8, ge=1, le=256, description="LoRA rank. Capped per base model by its max_lora_rank.")
    alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout applied to the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. ['q_proj','v_proj']) or 'all-linear' for every linear "
        "layer except the output head.",
    )


class Hyperparameters(BaseModel):
    """OpenAI's supervised hyperparameters; "auto" lets the service choose from the data size."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = Field(
        AUTO, description="Passes over the training file (1-50)."
    )
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        AUTO, description="Examples per optimizer step (1-256)."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO, description="Multiplier on the base model's default learning rate."
    )


class FineTuneSpec(BaseModel):
    """Everything the worker needs to run one supervised fine-tune. Version 1."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(1, description="Schema version of this spec.")
    model: str = Field(description="Base model name in the model store.")
    training_file: str = Field(description="File id of the training JSONL.")
    validation_file: str | None = Field(None, description="File id of the validation JSONL, if any.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    max_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Stop after this many optimizer steps; overrides n_epochs."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1.0, description="Absolute peak learning rate; overrides learning_rate_multiplier."
    )
    max_seq_len: int = Field(
        512, ge=16, le=32768, description="Tokens per example; longer examples are truncated and counted."
    )
    text_template: str | None = Field(
        None,
        description="Python format string rendering files of arbitrary fields, e.g. '{text} -> {label}'. "
        "Text before the first ' -> ' style separator is not marked; the whole text is trained on.",
    )
    seed: int = Field(42, description="Seed for data order, adapter initialisation and dropout.")
    log_every_steps: int = Field(10, ge=1, description="Emit a metrics event every N optimizer steps.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Compute validation loss every N steps (default: at log steps and the end)."
    )


# Default peak learning rate for adapters when the user gives neither learning_rate nor a multiplier.
BASE_LEARNING_RATE = 2e-4


def resolve_learning_rate(spec: FineTuneSpec) -> float:
    if spec.learning_rate is not None:
        return spec.learning_rate
    multiplier = spec.hyperparameters.learning_rate_multiplier
    return BASE_LEARNING_RATE * (1.0 if multiplier == AUTO else float(multiplier))


def resolve_batch_size(spec: FineTuneSpec, n_examples: int) -> int:
    batch_size = spec.hyperparameters.batch_size
    if batch_size != AUTO:
        return int(batch_size)
    # OpenAI picks roughly 0.2% of the data, clamped; small sets get small batches so they still take steps.
    return max(1, min(16, n_examples // 500 or 1, n_examples))


def resolve_n_epochs(spec: FineTuneSpec, n_examples: int) -> int:
    n_epochs = spec.hyperparameters.n_epochs
    if n_epochs != AUTO:
        return int(n_epochs)
    # Few examples need more passes to move the model; large sets one or two.
    if n_examples < 100:
        return 3
    return 2 if n_examples < 1000 else 1

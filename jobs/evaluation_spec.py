"""Evaluation jobs: the request, and the versioned spec stored as JSON on the job.

`EvaluationSettings` is what to measure and how; a fine-tuning job may carry one (`FineTuneSpec.evaluation`)
to be evaluated automatically when it succeeds. `EvaluationSpec` adds the data and the resolved targets:
jobs/evaluation.py resolves every target once, at creation, so the worker never has to guess what a target means.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.request_body import RequestBody

RESULTS_PURPOSE = "evaluation-results"

Metric = Literal["loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "rouge_l", "bleu"]
METRICS: tuple[str, ...] = ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy", "rouge_l", "bleu")
LOSS_METRICS = frozenset({"loss", "perplexity", "token_accuracy"})
GENERATION_METRICS = frozenset({"exact_match", "accuracy", "rouge_l", "bleu"})
DEFAULT_METRICS = ["loss", "perplexity", "token_accuracy", "exact_match"]
MAX_TARGETS = 8


class Normalization(BaseModel):
    """How generated and reference texts are normalised before `exact_match` compares them."""

    model_config = ConfigDict(extra="forbid")

    regex: str | None = Field(
        None,
        max_length=500,
        description="Extract the first match of this regular expression (its first group if it has one), e.g. "
        r"'####\s*(-?[\d,.]+)' for GSM8K's final number. A text without a match is compared whole.",
    )
    strip: bool = Field(True, description="Remove leading and trailing whitespace.")
    lowercase: bool = Field(False, description="Compare case-insensitively.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


class LabelSettings(BaseModel):
    """Label tasks (`accuracy`): the label set and how a generated text is read as a label."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(
        None,
        min_length=2,
        max_length=100,
        description="The label set. Default: the distinct references of the evaluation file, if it is a label "
        "task (at most 50 short single-line values that repeat).",
    )
    match: Literal["prefix", "first_mention"] = Field(
        "prefix",
        description="prefix (strict): the generated text, leading whitespace aside, starts with the label as a "
        "whole word. first_mention (lenient): the label mentioned first anywhere in the generated text.",
    )
    case_sensitive: bool = Field(False, description="Match labels case-sensitively.")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            stripped = [label.strip() for label in value]
            if any(not label for label in stripped):
                raise ValueError("labels must not be blank")
            if len({label.casefold() for label in stripped}) != len(stripped):
                raise ValueError("labels must be distinct")
            return stripped
        return value


class GenerationSettings(BaseModel):
    """How texts are generated for the generation metrics; recorded in the report."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(32, ge=1, le=4096, description="Most tokens generated per example.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (with do_sample).")
    top_k: int = Field(50, ge=1, le=100_000, description="Sample among the k likeliest tokens (with do_sample).")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Random seed for sampling.")
    stop: list[Annotated[str, Field(min_length=1, max_length=50)]] = Field(
        default_factory=list,
        max_length=8,
        description="Stop generating an example at the first of these strings (e.g. '\\n'); the text is cut "
        "before it. EOS always stops.",
    )
    batch_size: int = Field(
        16, ge=1, le=512, description="Examples per batch on PyTorch (left-padded); ONNX targets stream one by one."
    )


class EvaluationSettings(BaseModel):
    """What an evaluation measures and how. Version 1."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[Metric] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        min_length=1,
        description="loss, perplexity, token_accuracy (on the completion tokens); exact_match, accuracy, rouge_l, "
        "bleu (on generated text).",
    )
    text_template: str | None = Field(
        None,
        max_length=4000,
        description="For files of arbitrary fields: a format string like the training template. The text before "
        "its last field is the prompt; that field (and any text after it) is the expected completion.",
    )
    use_chat_template: bool = Field(
        False,
        description="Send prompt/completion and template prompts as a user message through the model's chat "
        "template (chat files always use it).",
    )
    normalization: Normalization = Field(default_factory=Normalization)
    labels: LabelSettings = Field(default_factory=LabelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    max_examples: int | None = Field(
        None, ge=1, le=1_000_000, description="Evaluate only the first N examples of the file."
    )
    report_examples: int = Field(
        20, ge=0, le=10_000, description="Per-example outputs included in the report for the first N examples."
    )
    max_seq_len: int = Field(
        1024,
        ge=16,
        le=32768,
        description="Tokens per example for the loss (longer ones are cut); prompts for generation keep their "
        "last max_seq_len - max_new_tokens tokens.",
    )

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @property
    def needs_generation(self) -> bool:
        return bool(GENERATION_METRICS & set(self.metrics))

    @property
    def needs_loss(self) -> bool:
        return bool(LOSS_METRICS & set(self.metrics))


class Target(BaseModel):
    """One resolved thing to score."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["model", "fine_tuning_job", "export_job"] = Field(description="What the target is.")
    name: str = Field(description="How the report names this target (unique within the job).")
    model: str = Field(description="The base model in the model store (the export's base for export targets).")
    job_id: str | None = Field(None, description="The fine-tuning or export job.")
    checkpoint_id: str | None = Field(None, description="A fine-tuning checkpoint, instead of the final adapter.")
    step: int | None = Field(None, description="The checkpoint's step.")
    file_id: str | None = Field(None, description="The adapter archive (fine-tuning) or package archive (export).")
    adapter: str | None = Field(None, description="The adapter of a multi-adapter export package.")
    adapter_file: str | None = Field(None, description="That adapter's path inside the package.")

    @property
    def backend(self) -> str:
        return "onnxruntime-genai" if self.type == "export_job" else "pytorch"


class EvaluationSpec(EvaluationSettings):
    """Everything the worker needs to run one evaluation. Version 1."""

    version: Literal[1] = Field(1, description="Schema version of this spec.")
    evaluation_file: str = Field(description="File id of the evaluation JSONL.")
    targets: list[Target] = Field(min_length=1, max_length=MAX_TARGETS, description="Targets, in report order.")

    def settings(self) -> EvaluationSettings:
        return EvaluationSettings.model_validate(self.model_dump(include=set(EvaluationSettings.model_fields)))


class TargetRequest(BaseModel):
    """One target: exactly one of model, fine_tuning_job or export_job."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A base model from GET /v1/models.")
    fine_tuning_job: str | None = Field(None, description="A succeeded fine-tuning job: its adapter.")
    checkpoint: str | int | None = Field(
        None,
        description="With fine_tuning_job: a checkpoint id (ftckpt-...), its fine_tuned_model_checkpoint name or "
        "a step number, instead of the result. Another project's checkpoint shared with this one needs it.",
    )
    export_job: str | None = Field(None, description="A succeeded export job: its ONNX package.")
    adapter: str | None = Field(None, description="With export_job: the adapter of a multi-adapter package, by name.")
    name: str | None = Field(None, min_length=1, max_length=100, description="How the report names this target.")

    @model_validator(mode="after")
    def _one_kind(self) -> TargetRequest:
        given = [k for k in ("model", "fine_tuning_job", "export_job") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of model, fine_tuning_job or export_job")
        if self.checkpoint is not None and self.fine_tuning_job is None:
            raise ValueError("checkpoint goes with fine_tuning_job")
        if self.adapter is not None and self.export_job is None:
            raise ValueError("adapter goes with export_job")
        return self


class CreateEvaluation(EvaluationSettings, RequestBody):
    evaluation_file: str = Field(description="Id of an uploaded JSONL (purpose fine-tune) to score the targets on.")
    targets: list[str | dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="What to score, in report order; differences are against the first. Each is an object "
        "({model} | {fine_tuning_job, checkpoint?} | {export_job, adapter?}, plus an optional name) or a string: a "
        "model name, a fine-tuning or export job id, or a checkpoint id.",
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)

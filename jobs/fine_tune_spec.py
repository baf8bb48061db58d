"""Fine-tuning jobs: the request (OpenAI's create body plus Grove's options) and the versioned spec stored as
JSON on the job row.

jobs/fine_tune.py builds a spec from the request once, at creation; the worker reads it back with
`FineTuneSpec.model_validate(job.spec)`. A new field needs a default so that old rows still load.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.evaluation_spec import EvaluationSettings
from jobs.export_spec import ExportOptions
from models.request_body import RequestBody

AUTO = "auto"
# In a text_template, marks where the trained completion starts: "Text: {text}\nEmotion:<|completion|> {label}".
COMPLETION_MARKER = "<|completion|>"


class AdapterConfig(BaseModel):
    """Which weights train, and how."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["lora", "qlora", "dora", "full"] = Field(
        "lora",
        description="lora: low-rank adapter; qlora: LoRA on a 4-bit NF4 base (bitsandbytes); dora: "
        "weight-decomposed low-rank adapter (peft use_dora); full: every weight of the model trains.",
    )
    r: int = Field(8, ge=1, le=256, description="LoRA rank. Capped per base model by its max_lora_rank.")
    alpha: int = Field(16, ge=1, le=1024, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout applied to the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. ['q_proj','v_proj']) or 'all-linear' for every linear "
        "layer except the output head. Ignored by type full.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter (e.g. ['lm_head']), besides the "
        "low-rank ones. Ignored by type full.",
    )
    double_quant: bool = Field(
        True, description="qlora only: also quantize the 4-bit quantization constants (bitsandbytes double quant)."
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


DEFAULT_DPO_BETA = 0.1


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones plus beta."""

    beta: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        AUTO,
        description="How far the trained model may move from the reference (the base with the adapter "
        f"switched off): larger keeps it closer. auto: {DEFAULT_DPO_BETA}.",
    )


class DpoSettings(BaseModel):
    """What a DPO job's spec adds to a supervised one."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(DEFAULT_DPO_BETA, gt=0, description="DPO's beta, resolved (auto: 0.1).")


class TrainingOptions(BaseModel):
    """Grove's training settings beyond OpenAI's: accepted as-is by the create request (extension fields)
    and stored in the spec."""

    model_config = ConfigDict(extra="forbid")

    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Adapter type, rank and modules.")
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
        max_length=4000,
        description="Python format string rendering files of arbitrary fields, e.g. '{text} -> {label}'. The "
        f"whole text is trained on, unless the template contains the marker {COMPLETION_MARKER!r}: then only "
        "the text after it is (a prompt/completion example).",
    )
    log_every_steps: int = Field(10, ge=1, description="Emit a metrics event every N optimizer steps.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Compute validation loss every N steps (default: at log steps and the end)."
    )
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        AUTO,
        description="Micro-batches per optimizer step (batch_size examples split evenly). auto: split by a "
        "token budget that fits the device's memory.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning rate after warm-up: linear decay to 0, cosine decay to 0, or constant."
    )
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5, description="Fraction of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0.0, le=1000.0, description="Gradient clipping norm; 0 turns it off.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        AUTO,
        description="Recompute activations in the backward pass to save memory. auto: on only when the "
        "estimated activations would not fit in the device's memory.",
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        AUTO,
        description="Compute dtype. auto: bf16 on a CUDA device that supports it; on a CPU, bf16 where its bf16 "
        "matmuls measure at least 1.3x as fast as fp32 at the model's shapes (CPUs with AVX512_BF16 or AMX), "
        "else fp32; the job's start event says which and why. bf16 on CPU keeps "
        "the frozen base in bf16 and computes lora/dora adapters in bf16, with fp32 master weights for the "
        "optimizer (saved weights are fp32). fp16 needs CUDA.",
    )
    compile: bool | Literal["auto"] = Field(
        AUTO,
        description="torch.compile the decoder layers (compiled once, shared by every layer, any sequence "
        "length). The first compile of a model and setting takes tens of seconds (cached on the worker "
        "after that); each step is then about a quarter faster on CPU. auto: on for CPU runs of at least "
        "1,000 steps (lora, dora, full; not qlora, not with gradient checkpointing).",
    )
    packing: bool = Field(
        True,
        description="Pack each batch's examples into rows of up to max_seq_len tokens, positions restarting "
        "per example and no attention across examples, instead of padding every example to the longest.",
    )
    group_by_length: bool = Field(
        False, description="Order each epoch so that batches hold examples of similar length (less padding)."
    )
    from_job: str | None = Field(
        None, description="Continue from the adapter of this succeeded fine-tuning job (same base model)."
    )
    from_checkpoint: str | None = Field(
        None,
        description="Continue from this checkpoint of an earlier job (same base model): its id (ftckpt-...) or "
        "its fine_tuned_model_checkpoint name; one of this project's, or one shared with it. Stored as the id.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Stop when the full validation loss, measured at each checkpoint, has not improved for "
        "this many checkpoints. Needs a validation_file.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="Smallest decrease of the validation loss that counts as an improvement."
    )
    result_adapter: Literal["best", "last"] = Field(
        "best",
        description="Which adapter the job publishes: the checkpoint with the lowest full validation loss "
        "(best; the last one without a validation_file) or the one after the last step.",
    )
    save_every_steps: int | None = Field(
        None, ge=1, description="Save a checkpoint every N steps, besides each epoch end and the last step."
    )
    keep_checkpoints: int = Field(
        3, ge=1, le=100, description="Checkpoints kept (listed and downloadable): the last N plus the best."
    )
    merged_model: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Also publish the base model with the adapter merged in (peft merge_and_unload), saved "
        "in this dtype.",
    )


class FineTuneSpec(TrainingOptions):
    """Everything the worker needs to run one fine-tune, supervised or DPO. Version 1."""

    version: Literal[1] = Field(1, description="Schema version of this spec.")
    model: str = Field(description="Base model name in the model store.")
    training_file: str = Field(description="File id of the training JSONL.")
    validation_file: str | None = Field(None, description="File id of the validation JSONL, if any.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(42, description="Seed for data order, adapter initialisation and dropout.")
    export: ExportOptions | None = Field(
        None, description="Export the adapter to ONNX when the job succeeds, as a child export job."
    )
    evaluation: EvaluationSettings | None = Field(
        None, description="Evaluate base model vs adapter on the validation file when the job succeeds (a child job)."
    )
    dpo: DpoSettings | None = Field(
        None,
        description="Set for a DPO job (method type dpo): train on preference pairs with the sigmoid DPO loss "
        "instead of the supervised loss. None: supervised.",
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


def resolve_gradient_accumulation(spec: FineTuneSpec, batch_size: int) -> int | None:
    """Micro-batches per step, or None when a token budget decides (auto)."""
    steps = spec.gradient_accumulation_steps
    return None if steps == AUTO else min(int(steps), batch_size)


# bf16 on a CPU only where its matmuls measured at least this much faster than fp32's: below it, the saved
# time would not pay for the rounding (and on CPUs without bf16 instructions bf16 is several times slower).
CPU_BF16_MIN_SPEEDUP = 1.3


def resolve_mixed_precision(
    spec: FineTuneSpec, cuda: bool, cuda_bf16: bool, cpu_bf16_speedup: float | None = None
) -> tuple[str, str]:
    """(bf16, fp16 or fp32, why) for the device at hand. `cpu_bf16_speedup`: fp32 matmul time over bf16's on
    this CPU at the model's shapes (worker/precision_probe.py), measured only where auto needs it."""
    if spec.mixed_precision != AUTO:
        return spec.mixed_precision, "set in the job's hyperparameters"
    if cuda:
        if cuda_bf16:
            return "bf16", "auto: this CUDA device supports bf16"
        return "fp32", "auto: this CUDA device has no bf16"
    if cpu_bf16_speedup is None:
        return "fp32", "auto: no bf16 measurement on this CPU"
    verdict = f"bf16 matmuls at this model's shapes ran {cpu_bf16_speedup:.2f}x as fast as fp32 on this CPU"
    if cpu_bf16_speedup >= CPU_BF16_MIN_SPEEDUP:
        return "bf16", f"auto: {verdict}"
    return "fp32", f"auto: {verdict} (bf16 needs {CPU_BF16_MIN_SPEEDUP}x)"


def split_at_completion_marker(template: str | None) -> tuple[str, str] | None:
    """(prompt part, completion part) of a text_template with the completion marker, else None."""
    if not template or COMPLETION_MARKER not in template:
        return None
    prompt, _, completion = template.partition(COMPLETION_MARKER)
    return prompt, completion


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(
        default_factory=DpoHyperparameters, description="beta and the supervised hyperparameters."
    )


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo"] = Field(
        "supervised",
        description="supervised: learn the assistant replies of chat or prompt/completion data; dpo: direct "
        "preference optimization on preference pairs.",
    )
    supervised: SupervisedMethod | None = Field(None, description="Settings of a supervised job.")
    dpo: DpoMethod | None = Field(None, description="Settings of a dpo job.")


class CreateFineTuningJob(TrainingOptions, RequestBody):
    """OpenAI's create request; the fields of TrainingOptions (adapter, max_steps, lr_scheduler, packing, ...)
    are Grove's extensions, sent by the SDK via `extra_body`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model name from GET /v1/models.")
    training_file: str = Field(description="Id of an uploaded file with purpose fine-tune.")
    validation_file: str | None = Field(None, description="Id of an uploaded file for validation loss.")
    hyperparameters: Hyperparameters | None = Field(
        None, description="Deprecated by OpenAI in favour of method.supervised.hyperparameters; still read."
    )
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Seed of the run. Omitted: one is drawn and shown on the job."
    )
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported; must be empty.")

    # Grove extensions whose default depends on the model or on another job.
    max_seq_len: int | None = Field(
        None, ge=16, le=32768, description="Tokens per example (default 512, or the model's context if shorter)."
    )
    export: ExportOptions | None = Field(None, description="Export to ONNX on success (a child export job).")
    evaluation: EvaluationSettings | None = Field(
        None, description="Evaluate on the validation_file on success (a child evaluation job, base vs adapter)."
    )

    @property
    def method_type(self) -> str:
        return self.method.type if self.method else "supervised"

    def effective_hyperparameters(self) -> Hyperparameters:
        """The supervised hyperparameters (for dpo, those of method.dpo less beta)."""
        if self.method and self.method.type == "dpo":
            given = self.method.dpo.hyperparameters if self.method.dpo else DpoHyperparameters()
            return Hyperparameters(**given.model_dump(exclude={"beta"}))
        if self.method and self.method.supervised:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()

    def dpo_settings(self) -> DpoSettings | None:
        if self.method_type != "dpo":
            return None
        beta = self.method.dpo.hyperparameters.beta if self.method.dpo else AUTO
        return DpoSettings(beta=DEFAULT_DPO_BETA if beta == AUTO else float(beta))

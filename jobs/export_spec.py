"""Export jobs: the request, the versioned spec the worker runs, and what the builder can make.

An export job turns a base model from the store, optionally with the LoRA adapters of succeeded fine-tuning
jobs (or named checkpoints of them), into an onnxruntime-genai model package (see worker/export.py for
the package layout and the result contract). The checks and the creation are jobs/export.py's.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.config import get_settings
from models.request_body import RequestBody

Precision = Literal["int4", "int8", "fp16", "bf16", "fp32"]
Provider = Literal["cpu", "cuda"]
AdapterMode = Literal["merged", "separate", "multi"]

# What the onnxruntime-genai model builder can build and run per execution provider.
PRECISIONS_FOR_PROVIDER: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp32", "fp16", "bf16", "int8", "int4"),
}
# The LoRA-wrapped linear layers the builder keeps as their own MatMuls (Llama-style decoders).
LORA_MODULES = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
    "qkv_proj": "attn",
    "gate_up_proj": "mlp",
}
# Fused projections (Phi-3): the builder unpacks a fused LoRA layer into one LoRA pair per projection, each with
# the fused lora_A and its own rows of lora_B, in this order (make_attention_unpacked_lora, make_mlp_unpacked_lora).
FUSED_LORA_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# The decoder architectures onnxruntime-genai 0.18's model builder builds (builder.py's create_model), as Grove
# loads them (AutoModelForCausalLM). Another base model trains, but is refused at export creation.
BUILDER_ARCHITECTURES = frozenset(
    {
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GptOssForCausalLM",
        "GraniteForCausalLM",
        "GraniteMoeHybridForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "InternLM2ForCausalLM",
        "Lfm2ForCausalLM",
        "Lfm2MoeForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Phi3SmallForCausalLM",
        "PhiMoEForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
# Parity gate defaults per precision: (least share of matching greedy tokens, largest mean |logit diff|).
# Calibrated on smollm2-135m-instruct (docs/BENCHMARKS.md, Export): its k-quant int4 CPU exports (accuracy
# level 4) match 60-92% of PyTorch's greedy tokens with a mean |logit diff| of 1.9-3.0 while losing under a
# point of emotion accuracy; fp32 matches every token. A broken export (an adapter not applied, wrong inputs)
# falls far below the token match.
GATE_DEFAULTS: dict[str, tuple[float, float]] = {
    "fp32": (1.0, 0.01),
    "fp16": (0.9, 0.5),
    "bf16": (0.85, 0.75),
    "int8": (0.7, 1.5),
    "int4": (0.5, 4.0),
}
FIXED_PROMPTS = ["The capital of France is", "Write a short story about a robot.", "def fibonacci(n):"]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ADAPTERS = 16


class Quantization(BaseModel):
    """Weight-only MatMulNBits options for int4 and int8."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["k_quant", "rtn"] = Field(
        "k_quant",
        description="How each block's scale is chosen. k_quant: searched to minimise the block's error "
        "(llama.cpp's k-quants); rtn: round to nearest from the block's largest weight, the builder's default. "
        "Same size and speed; k_quant builds a few seconds slower and keeps more accuracy (docs/BENCHMARKS.md).",
    )
    int8_sensitive_layers: bool = Field(
        True,
        description="int4 only: keep the most quantization-sensitive MatMuls in int8, as llama.cpp's Q4_K_M does "
        "(the first and last eighth of the layers and every third layer's qkv, v and down projections). About "
        "10% larger and a third slower to generate than all-int4, and within a point of fp32 accuracy where "
        "all-int4 lost two (docs/BENCHMARKS.md, Export).",
    )

    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="Weights per quantization block (int4/int8). The builder's default is 32."
    )
    accuracy_level: int | None = Field(
        None,
        ge=0,
        le=4,
        description="Least precision of the quantized MatMul's activations: 1 fp32, 2 fp16, 3 bf16, 4 int8. "
        "Default: 4 on CPU, 0 (unset) on CUDA.",
    )


class GateOptions(BaseModel):
    """The parity gate run before publishing: ONNX greedy generation against the PyTorch model."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] | None = Field(
        None,
        max_length=8,
        description="Prompts to generate from. Default: the first examples of the fine-tuning job's validation "
        "(else training) file, cut before the answer; fixed prompts for a base model.",
    )
    n_prompts: int = Field(3, ge=1, le=8, description="How many prompts to take when none are given.")
    max_new_tokens: int = Field(16, ge=1, le=128, description="Greedy tokens generated per prompt and check.")
    min_token_match: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Least share of generated tokens that PyTorch, fed the same tokens, also picks greedily. "
        "Default per precision: fp32 1.0 (every token), fp16 0.9, bf16 0.85, int8 0.7, int4 0.5.",
    )
    max_mean_abs_logit_diff: float | None = Field(
        None,
        gt=0.0,
        description="Largest mean absolute difference between the ONNX and PyTorch logits over the generated "
        "positions. Default per precision: fp32 0.01, fp16 0.5, bf16 0.75, int8 1.5, int4 4.0.",
    )


class ExportOptions(BaseModel):
    """How to export. Also the `export` section of a fine-tuning job's spec (exported when it succeeds)."""

    model_config = ConfigDict(extra="forbid")

    precision: Precision = Field("int4", description="Weight precision: int4, int8, fp16, bf16 or fp32.")
    execution_provider: Provider = Field(
        "cpu", description="Where the model will run: cpu or cuda. fp16 and bf16 need cuda."
    )
    adapter_mode: AdapterMode | None = Field(
        None,
        description="merged: LoRA folded into the weights; separate: LoRA kept as its own MatMuls; multi: one "
        "base model with LoRA weights as inputs plus one .onnx_adapter per fine-tuning job. Default: merged "
        "for one adapter, multi for several.",
    )
    quantization: Quantization = Field(default_factory=Quantization)
    gate: GateOptions = Field(default_factory=GateOptions)


class AdapterSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fine_tuning_job: str = Field(description="Id of a succeeded fine-tuning job of this project.")
    checkpoint: str | None = Field(
        None,
        description="One of the job's checkpoints, its id (ftckpt-...) or fine_tuned_model_checkpoint name, to "
        "export instead of its final adapter. Another project's checkpoint shared with this one needs it.",
    )
    name: str | None = Field(
        None,
        description="Adapter name in the package (og.Adapters.load name). Default: the job's suffix, else its "
        "id; '-step-N' is appended for a checkpoint.",
    )


class ExportSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Base model name in the model store. Optional when adapters are given (their base)."
    )
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="Fine-tuning jobs whose adapters to export; more than one needs adapter_mode multi.",
    )


class ResolvedAdapter(BaseModel):
    """An adapter as resolved at creation: which archive to use and its shape."""

    name: str = Field(description="Adapter name in the package.")
    fine_tuning_job: str = Field(description="The fine-tuning job it came from.")
    checkpoint: str | None = Field(None, description="Checkpoint id, when a checkpoint was exported.")
    step: int | None = Field(None, description="Training step of the checkpoint, or of the final adapter.")
    file_id: str = Field(description="The adapter archive (a tar of a peft adapter directory).")
    rank: int = Field(description="LoRA rank r.")
    alpha: float = Field(description="LoRA alpha.")
    target_modules: list[str] = Field(description="Adapted module names, sorted.")
    use_dora: bool = Field(False, description="Whether the adapter is DoRA (merged mode only).")


class ExportSpec(ExportOptions):
    """Everything the worker needs to run one export. Version 1; stored as JSON on the job row."""

    version: Literal[1] = Field(1, description="Schema version of this spec.")
    model: str = Field(description="Base model name in the model store.")
    adapters: list[ResolvedAdapter] = Field(default_factory=list, description="Resolved adapters, in order.")


def export_queue(provider: str) -> str:
    """The Celery queue whose workers can build and verify for this execution provider."""
    settings = get_settings()
    if provider == "cuda":
        return settings.export_cuda_queue
    return settings.export_cpu_queue or settings.fine_tune_queue


class CreateExport(ExportOptions, RequestBody):
    """POST /v1/exports: a source plus the export options (precision, provider, adapter mode, ...)."""

    model_config = ConfigDict(extra="forbid")

    source: ExportSource = Field(description="The base model, and the fine-tuning jobs whose adapters to export.")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="Free-form labels kept on the job.")

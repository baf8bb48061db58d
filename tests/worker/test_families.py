"""Every decoder family's tiny test model (worker/prepare_models.py) trains with every method, in-process.

Two optimizer steps per family and method (QLoRA through bitsandbytes' CPU 4-bit path): about a second each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.export_spec import BUILDER_ARCHITECTURES
from tests.worker.test_train import RecordingHooks, chat_examples, make_spec
from worker.prepare_models import TINY_FAMILIES, ensure_model, read_model_info
from worker.train import train_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

FAMILIES = sorted(TINY_FAMILIES)
METHODS = ["lora", "dora", "full", "qlora"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, model_store: Path) -> Path:
    return ensure_model(model_store, request.param)


def test_family_model_is_what_the_builder_builds(family_dir: Path):
    from transformers import AutoConfig

    info = read_model_info(family_dir)
    config = AutoConfig.from_pretrained(str(family_dir), local_files_only=True)
    assert info["architecture"] == config.architectures[0] == TINY_FAMILIES[family_dir.name][1]
    assert info["architecture"] in BUILDER_ARCHITECTURES
    assert config.vocab_size == 49152 and config.num_hidden_layers == 2 and config.hidden_size == 64
    assert 1_000_000 < info["parameters"] < 10_000_000


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(family_dir: Path, method: str, tmp_path: Path):
    adapter = {"type": method} if method == "full" else {"type": method, "r": 4, "alpha": 8}
    spec = make_spec(model=family_dir.name, adapter=adapter, max_steps=2, learning_rate=1e-3)
    hooks = RecordingHooks()
    outcome = train_adapter(spec, family_dir, chat_examples(8), None, tmp_path, hooks)
    assert outcome.steps == 2 and hooks.started[1]["adapter_type"] == method
    assert outcome.train_loss is not None and math.isfinite(outcome.train_loss)
    base = load_file(str(family_dir / "model.safetensors"))
    if method == "full":
        trained = load_file(str(outcome.adapter_dir / "model.safetensors"))
        assert any(not torch.equal(trained[name], value) for name, value in base.items() if name in trained)
        return
    config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    weights = load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))
    # lora_B starts at zero: two steps moved every one of them.
    lora_b = [value for name, value in weights.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(value) > 0 for value in lora_b)
    if TINY_FAMILIES[family_dir.name][1] == "Phi3ForCausalLM":  # the fused projections are adapted as they are
        assert {"qkv_proj", "gate_up_proj"} <= {m.rsplit(".", 1)[-1] for m in config["target_modules"]}

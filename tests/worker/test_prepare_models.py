from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from worker import prepare_models
from worker.prepare_models import MODELS, READY_FILE, Recipe, ensure_model, is_ready, read_model_info

HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_tiny_model_is_deterministic_and_idempotent(tmp_path: Path):
    first = ensure_model(tmp_path / "a", "tiny-llama-test")
    second = ensure_model(tmp_path / "b", "tiny-llama-test")
    for name in [*HF_FILES, "chat_template.jinja"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    info = read_model_info(first)
    assert set(info) == {
        "name",
        "description",
        "architecture",
        "parameters",
        "context_length",
        "max_lora_rank",
        "source",
        "created",
    }
    assert info["name"] == "tiny-llama-test"
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["max_lora_rank"] == 16
    assert info["context_length"] == 2048
    assert 1_000_000 < info["parameters"] < 10_000_000

    # Already prepared: returns at once, rebuilds nothing.
    before = (first / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_model(tmp_path / "a", "tiny-llama-test") == first
    assert time.monotonic() - started < 0.5
    assert (first / "model.safetensors").stat().st_mtime_ns == before
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_tiny_model_loads_with_chat_template(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token == "<|im_end|>" == tokenizer.eos_token
    assert len(tokenizer) == 49152
    # The real SmolLM2 vocabulary: common words are single tokens.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Paris").input_ids) == ["ĠParis"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    assert "quantization_config" not in json.loads((tiny_model_dir / "config.json").read_text())


def test_failed_build_leaves_nothing_visible(tmp_path: Path, monkeypatch):
    def broken_build(directory: Path):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setitem(MODELS, "broken", Recipe("broken", 8, "test", broken_build))
    with pytest.raises(RuntimeError, match="boom"):
        ensure_model(tmp_path, "broken")
    assert not (tmp_path / "broken").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert not is_ready(tmp_path, "broken")


class _FakeModel:
    class config:  # noqa: N801
        architectures = ["FakeForCausalLM"]
        max_position_embeddings = 64

    def parameters(self):
        return []


@pytest.fixture
def fake_model(monkeypatch) -> str:
    """A recipe that builds in no time."""

    def build(directory: Path):
        (directory / "config.json").write_text("{}")
        return _FakeModel()

    monkeypatch.setitem(MODELS, "fake", Recipe("fake", 8, "test", build))
    return "fake"


def test_incomplete_directory_is_replaced(tmp_path: Path, fake_model: str):
    (tmp_path / fake_model).mkdir()
    (tmp_path / fake_model / "stale.bin").write_text("half written by someone else")
    path = ensure_model(tmp_path, fake_model)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", READY_FILE]
    assert read_model_info(path)["architecture"] == "FakeForCausalLM"
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_only(tmp_path: Path, fake_model: str, capsys):
    assert prepare_models.main(["--store", str(tmp_path), "--only", fake_model]) == 0
    assert "fake: prepared" in capsys.readouterr().out
    assert is_ready(tmp_path, fake_model)
    assert not (tmp_path / "tiny-llama-test").exists()
    assert prepare_models.main(["--store", str(tmp_path), "--only", fake_model]) == 0
    assert "fake: already prepared" in capsys.readouterr().out


def test_unknown_model(tmp_path: Path):
    with pytest.raises(KeyError, match="unknown model"):
        ensure_model(tmp_path, "no-such-model")


@pytest.mark.slow
def test_smollm2_answers_paris(model_store: Path):
    path = ensure_model(model_store, "smollm2-135m-instruct")
    info = read_model_info(path)
    assert info["max_lora_rank"] == 64
    assert info["context_length"] == 8192
    assert 130_000_000 < info["parameters"] < 140_000_000
    assert "Paris" in prepare_models.check_generation(path)


@pytest.mark.slow
def test_gemma3_completes_text(model_store: Path):
    """The Gemma 3 270M GGUF (a base model: plain text completion, no instruction following) loads with its own
    architecture, tokenizer and Gemma's turn format, and completes text sensibly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(model_store, "gemma3-270m")
    info = read_model_info(path)
    assert (info["architecture"], info["context_length"], info["max_lora_rank"]) == ("Gemma3ForCausalLM", 32768, 64)
    assert 260_000_000 < info["parameters"] < 270_000_000
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    turn = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    inputs = tokenizer("Question: What is 2+2?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, inputs["input_ids"].shape[1] :]).startswith(" 2+2=4")

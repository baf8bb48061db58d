from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from jobs.fine_tune_spec import FineTuneSpec
from models.datasets import ChatExample, DatasetError, PromptCompletionExample
from worker.train import TrainOutcome, train_adapter

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when loading an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


class RecordingHooks:
    def __init__(self, stop_after: int | None = None, pause_after: int | None = None):
        self.stop_after = stop_after  # answer True on this call of should_stop (1-based)
        self.pause_after = pause_after  # answer True on this call of should_pause (1-based)
        self.pause_calls = 0
        self.started: tuple[int, dict] | None = None
        self.metrics: list[tuple[int, int, dict]] = []
        self.checkpoints: list[tuple[int, Path, dict]] = []
        self.kept: list[int] = []
        self.events: list[tuple[str, str, dict]] = []
        self.stop_calls = 0

    def on_start(self, total_steps: int, stats: dict) -> None:
        self.started = (total_steps, stats)

    def on_metrics(self, step: int, total_steps: int, metrics: dict) -> None:
        self.metrics.append((step, total_steps, metrics))

    def on_checkpoint(self, step: int, path: Path, metrics: dict, kept: list[int]) -> None:
        self.checkpoints.append((step, path, metrics))
        self.kept = kept

    def on_event(self, type: str, message: str, data: dict) -> None:
        self.events.append((type, message, data))

    def should_stop(self) -> bool:
        self.stop_calls += 1
        return self.stop_after is not None and self.stop_calls >= self.stop_after

    def should_pause(self) -> bool:
        self.pause_calls += 1
        return self.pause_after is not None and self.pause_calls >= self.pause_after


def chat_examples(n: int) -> list[ChatExample]:
    return [
        ChatExample(
            messages=[
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
            ]
        )
        for i in range(n)
    ]


def make_spec(**overrides) -> FineTuneSpec:
    fields = {
        "model": "tiny-llama-test",
        "training_file": "file-train",
        "hyperparameters": {"batch_size": 4, "n_epochs": 1},
        "learning_rate": 1e-2,
        "log_every_steps": 1,
        "max_seq_len": 64,
    }
    fields.update(overrides)
    return FineTuneSpec.model_validate(fields)


def run(tiny_model_dir: Path, work_dir: Path, hooks=None, examples=None, valid=None, **spec) -> TrainOutcome:
    hooks = hooks or RecordingHooks()
    return train_adapter(make_spec(**spec), tiny_model_dir, examples or chat_examples(12), valid, work_dir, hooks)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory) -> tuple[TrainOutcome, RecordingHooks]:
    """Two epochs of 3 steps on 12 examples, with validation."""
    hooks = RecordingHooks()
    outcome = run(
        tiny_model_dir,
        tmp_path_factory.mktemp("work"),
        hooks,
        valid=chat_examples(20)[12:],
        hyperparameters={"batch_size": 4, "n_epochs": 2},
        log_every_steps=2,
    )
    return outcome, hooks


def test_training_reports_progress(trained):
    outcome, hooks = trained
    assert not outcome.stopped
    assert outcome.steps == outcome.total_steps == 6
    total_steps, stats = hooks.started
    assert total_steps == 6
    assert stats["n_examples"] == 12 and stats["n_truncated"] == 0
    assert stats["batch_size"] == 4 and stats["n_epochs"] == 2
    assert stats["learning_rate"] == 1e-2
    assert stats["learning_rate_multiplier"] == pytest.approx(50.0)
    json.dumps(stats)  # recorded as event data
    json.dumps([metrics for _, _, metrics in hooks.metrics])
    assert stats["device"] == "cpu"
    assert stats["n_tokens"] > 0
    # Logged every 2 steps; epoch ends (3, 6) are logged too, with a checkpoint and the full validation loss.
    assert [step for step, _, _ in hooks.metrics] == [2, 3, 4, 6]
    assert [row["step"] for row in outcome.metrics_rows] == [2, 3, 4, 6]
    for _, total, metrics in hooks.metrics:
        assert total == 6
        assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
        assert metrics["valid_loss"] is not None and math.isfinite(metrics["valid_loss"])
        assert metrics["tokens_per_second"] > 0
        assert metrics["learning_rate"] > 0
    assert hooks.metrics[-1][2]["trained_tokens"] == outcome.trained_tokens == 2 * stats["n_tokens"]
    assert outcome.train_loss == hooks.metrics[-1][2]["train_loss"]
    assert outcome.valid_loss == hooks.metrics[-1][2]["full_valid_loss"]
    # A tiny random model on a repetitive task at a high learning rate: the loss goes down.
    assert outcome.metrics_rows[-1]["train_loss"] < outcome.metrics_rows[0]["train_loss"]
    assert outcome.metrics_rows[-1]["valid_loss"] < outcome.metrics_rows[0]["valid_loss"]


def test_checkpoints_at_epoch_ends(trained):
    outcome, hooks = trained
    assert [step for step, _, _ in hooks.checkpoints] == [3, 6]
    assert outcome.checkpoints == [path for _, path, _ in hooks.checkpoints]
    for _, path, metrics in hooks.checkpoints:
        assert sorted(p.name for p in path.iterdir() if p.suffix != ".md") == [
            "adapter_config.json",
            "adapter_model.safetensors",
            "training_state.json",
            "training_state.safetensors",
        ]
        assert metrics["full_valid_loss"] is not None


def test_adapter_is_trained_and_base_untouched(trained, tiny_model_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome, _ = trained
    adapter = load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))
    assert any("lora_A" in name for name in adapter)
    for name, tensor in adapter.items():
        assert torch.count_nonzero(tensor) > 0, name  # lora_B starts at zero
    assert (outcome.adapter_dir / "tokenizer.json").is_file()

    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(outcome.adapter_dir))
    merged_names = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(param, base_file[key]), name
        merged_names += 1
    assert merged_names == len(base_file)

    inputs = torch.tensor([[1, 4093, 198, 33, 34]])
    with torch.no_grad():
        adapted = model(input_ids=inputs).logits
        with model.disable_adapter():
            plain = model(input_ids=inputs).logits
    assert not torch.allclose(adapted, plain)


def test_lora_a_moves_from_its_initialisation(trained, tiny_model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    outcome, _ = trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    torch.manual_seed(42)  # the spec's default seed
    initial = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
    initial_a = {n: p for n, p in initial.named_parameters() if "lora_A" in n}
    adapter = load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))
    trained_a = {n: t for n, t in adapter.items() if "lora_A" in n}
    assert len(trained_a) == len(initial_a) > 0
    for name, tensor in trained_a.items():
        reference = initial_a[name.replace(".weight", ".default.weight")]
        assert reference.shape == tensor.shape
        assert not torch.equal(reference, tensor), name


def test_same_seed_same_adapter(tiny_model_dir: Path, tmp_path: Path):
    import torch

    one = run(tiny_model_dir, tmp_path / "one", max_steps=2, seed=7)
    two = run(tiny_model_dir, tmp_path / "two", max_steps=2, seed=7)
    other = run(tiny_model_dir, tmp_path / "other", max_steps=2, seed=8)
    a, b, c = (load_file(str(o.adapter_dir / "adapter_model.safetensors")) for o in (one, two, other))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[name], c[name]) for name in a)
    assert [r["train_loss"] for r in one.metrics_rows] == [r["train_loss"] for r in two.metrics_rows]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_should_stop_ends_between_steps(tiny_model_dir: Path, tmp_path: Path, stop_after: int):
    hooks = RecordingHooks(stop_after=stop_after)
    outcome = run(tiny_model_dir, tmp_path, hooks, hyperparameters={"batch_size": 2, "n_epochs": 3})
    assert outcome.stopped
    assert outcome.total_steps == 18
    assert outcome.steps == stop_after
    assert outcome.valid_loss is None
    assert (outcome.adapter_dir / "adapter_model.safetensors").is_file()
    assert all(step <= stop_after for step, _, _ in hooks.metrics)


def test_max_steps_overrides_epochs_and_dora(tiny_model_dir: Path, tmp_path: Path):
    examples = [PromptCompletionExample(prompt=f"{i} + {i} =", completion=f" {2 * i}") for i in range(6)]
    hooks = RecordingHooks()
    outcome = run(
        tiny_model_dir,
        tmp_path,
        hooks,
        examples=examples,
        max_steps=5,
        log_every_steps=3,
        hyperparameters={"batch_size": 4, "n_epochs": 1},
        adapter={"type": "dora", "r": 32, "target_modules": ["q_proj", "v_proj"]},
    )
    assert outcome.steps == outcome.total_steps == 5
    # Logged every 3 steps, at checkpoints and at the last. 2 steps per epoch: checkpoints where epochs end,
    # at steps 2 and 4, and at the last step.
    assert [step for step, _, _ in hooks.metrics] == [2, 3, 4, 5]
    assert [step for step, _, _ in hooks.checkpoints] == [2, 4, 5]
    assert all(math.isfinite(metrics["train_loss"]) for _, _, metrics in hooks.checkpoints)
    assert outcome.valid_loss is None
    assert all(row["valid_loss"] is None for row in outcome.metrics_rows)
    config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["r"] == 16  # capped by the tiny model's max_lora_rank
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert any("magnitude" in name for name in load_file(str(outcome.adapter_dir / "adapter_model.safetensors")))


def test_nothing_to_train_on(tiny_model_dir: Path, tmp_path: Path):
    examples = [
        ChatExample(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}])
    ]
    with pytest.raises(DatasetError, match="no training example"):
        run(tiny_model_dir, tmp_path, examples=examples)


@pytest.mark.slow
def test_smollm2_steps(model_store: Path, tmp_path: Path):
    from worker.prepare_models import ensure_model

    base = ensure_model(model_store, "smollm2-135m-instruct")
    hooks = RecordingHooks()
    spec = make_spec(model="smollm2-135m-instruct", learning_rate=None, max_steps=3, hyperparameters={"batch_size": 8})
    outcome = train_adapter(spec, base, chat_examples(16), chat_examples(20)[16:], tmp_path, hooks)
    assert outcome.steps == 3
    assert outcome.train_loss is not None and outcome.train_loss < 3
    assert outcome.metrics_rows[-1]["tokens_per_second"] > 0

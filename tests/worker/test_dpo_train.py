"""DPO in the training loop on tiny-llama-test: how pairs are tokenized, what a run reports, and that it has
what a supervised run has (resume from a checkpoint, early stopping, starting from an earlier adapter)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from models.datasets import PreferenceExample
from tests.worker.test_train import RecordingHooks, make_spec
from tests.worker.test_train_engine import adapter_of, assert_same, base_state, run
from worker.checkpoints import checkpoint_steps
from worker.data import IGNORE_INDEX, encode_examples, finalize_pairs
from worker.train import train_adapter

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

DPO = {"dpo": {"beta": 0.1}, "learning_rate": 1e-2}


def pairs(n: int, offset: int = 0) -> list[PreferenceExample]:
    return [
        PreferenceExample(
            messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"{i} + {i}?"}],
            chosen=f"{2 * i}",
            rejected=f"I would guess it is {2 * i + 1}, but I am really not sure about that.",
        )
        for i in range(offset, offset + n)
    ]


def test_a_pair_is_the_prompt_then_each_reply_with_labels_on_the_reply(tiny_tokenizer):
    example = pairs(1, offset=3)[0]
    data = finalize_pairs(encode_examples([example], tiny_tokenizer), 512)
    (row,) = data.rows
    prompt = tiny_tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for side, reply in ((row, example.chosen), (row["rejected"], example.rejected)):
        ids, labels = side["input_ids"], side["labels"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        trained = ids[len(prompt_ids) :]
        assert labels[len(prompt_ids) :] == trained  # the reply, through its end token, and nothing after it
        text = tiny_tokenizer.decode(trained)
        assert text.startswith(reply) and text[len(reply) :].strip() in {"<|im_end|>", "</s>", "<|eot_id|>"}
    assert data.n_examples == 1 and data.n_tokens == len(row["input_ids"]) + len(row["rejected"]["input_ids"])


def test_a_pair_cut_before_a_reply_is_skipped(tiny_tokenizer):
    encoded = encode_examples(pairs(2), tiny_tokenizer)
    prompt_len = encoded[0][1].count(IGNORE_INDEX)
    data = finalize_pairs(encoded, prompt_len + 2)  # room for a bit of the short reply, and of the long one
    assert data.n_examples == 2 and data.n_truncated == 2 and len(data.rows) == 2
    data = finalize_pairs(encoded, prompt_len)  # no reply token left
    assert data.n_skipped == 2 and not data.rows


def test_dpo_run_reports_rewards_and_leaves_the_base_untouched(tiny_model_dir: Path, tmp_path: Path):
    outcome, hooks = run(
        tiny_model_dir,
        tmp_path,
        RecordingHooks(),
        examples=pairs(12),
        valid=pairs(4, offset=12),
        hyperparameters={"batch_size": 4, "n_epochs": 2},
        **DPO,
    )
    assert not outcome.stopped and outcome.steps == 6
    assert hooks.started[1]["n_examples"] == 12 and hooks.started[1]["n_valid_examples"] == 4
    first = hooks.metrics[0][2]
    # A new adapter starts as the base: the policy is the reference, every reward 0, the loss log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    last = hooks.metrics[-1][2]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert name in last and f"valid_{name}" in last and f"full_valid_{name}" in last
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], abs=1e-5)
    assert last["train_loss"] < math.log(2) and last["valid_rewards/margins"] > 0
    assert last["full_valid_rewards/accuracies"] == 1.0 and "train_mean_token_accuracy" not in last
    assert outcome.valid_loss == last["full_valid_loss"] < math.log(2)
    adapter = adapter_of(outcome)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    base = base_state(tiny_model_dir)
    assert all(torch.equal(v, base[k]) for k, v in base.items())


def test_dpo_resumes_where_the_last_checkpoint_left(tiny_model_dir: Path, tmp_path: Path):
    settings = {
        "examples": pairs(16),
        "valid": pairs(4, offset=16),
        "hyperparameters": {"batch_size": 4, "n_epochs": 2},
        "adapter": {"r": 4, "dropout": 0.2},
        "save_every_steps": 2,
        "seed": 5,
        **DPO,
    }
    reference, _ = run(tiny_model_dir, tmp_path / "ref", **settings)
    work = tmp_path / "job"
    interrupted, _ = run(tiny_model_dir, work, RecordingHooks(stop_after=5), **settings)
    assert interrupted.stopped and checkpoint_steps(work)[-1] == 4
    shutil.rmtree(work / "adapter")
    resumed, hooks = run(tiny_model_dir, work, **settings)
    assert resumed.resumed_from == 4 and resumed.steps == reference.steps == 8
    assert_same(adapter_of(resumed), adapter_of(reference))
    keys = ("step", "train_loss", "full_valid_loss", "rewards/margins", "valid_rewards/accuracies")
    assert [[r.get(k) for k in keys] for r in resumed.metrics_rows] == [
        [r.get(k) for k in keys] for r in reference.metrics_rows
    ]


def test_dpo_stops_early_on_the_validation_loss(tiny_model_dir: Path, tmp_path: Path):
    outcome, _ = run(
        tiny_model_dir,
        tmp_path,
        RecordingHooks(),
        examples=pairs(8),
        valid=pairs(4, offset=8),
        max_steps=30,
        hyperparameters={"batch_size": 4},
        save_every_steps=1,
        early_stopping_patience=2,
        early_stopping_threshold=100.0,  # no decrease is large enough: stop after two checkpoints past the first
        **DPO,
    )
    assert outcome.early_stopped and outcome.steps == 3 and outcome.best_step == 1


def test_dpo_from_an_earlier_adapter_takes_the_base_as_reference(tiny_model_dir: Path, tmp_path: Path):
    sft, _ = run(tiny_model_dir, tmp_path / "sft", max_steps=3, learning_rate=5e-2)
    hooks = RecordingHooks()

    train_adapter(
        make_spec(max_steps=1, **DPO),
        tiny_model_dir,
        pairs(4),
        None,
        tmp_path / "dpo",
        hooks,
        init_dir=sft.adapter_dir,
    )
    first = hooks.metrics[0][2]
    # The policy starts as the supervised adapter, the reference is the base: the rewards are not 0.
    assert first["rewards/chosen"] != 0.0 and first["train_loss"] != pytest.approx(math.log(2), abs=1e-4)

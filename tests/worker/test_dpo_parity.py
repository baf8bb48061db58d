"""Grove's DPO step against TRL's DPOTrainer (trl 1.16.0) on tiny-llama-test: one batch of preference pairs,
the same LoRA weights, the reference being the base with the adapter switched off in both. The first step's
loss and every LoRA gradient must agree within floating-point tolerance.

Two starting points: the adapter as Grove initialises it for a new job (lora_B zero: the policy is the base, the
loss log 2, lora_A's gradient zero), and one with lora_B drawn at random, as an adapter continued from a
supervised job (from_job) is, where neither the loss nor any gradient is trivial. Given an adapter already
trained, TRL makes its reference a frozen copy of it (a "ref" adapter); Grove's reference is the base, as the
issue asks, so for the comparison that copy is removed and TRL too falls back to disabling the adapter.

The batch is tokenized once, by Grove (worker/data.py), and handed to TRL as token ids: TRL's own tokenization
also trains on the template's newline after the end token, which Grove leaves out, and the comparison is of
the loss and its gradient, not of the tokenization.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.datasets import PreferenceExample
from tests.worker.test_train import RecordingHooks, make_spec
from worker.data import IGNORE_INDEX, encode_examples, finalize_pairs
from worker.dpo_step import DpoTrainer
from worker.model_setup import build_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BETA = 0.1


def pairs() -> list[PreferenceExample]:
    return [
        PreferenceExample(
            messages=[{"role": "user", "content": f"How do you feel about day {i}?"}],
            chosen=["joy", "sadness", "anger", "fear"][i % 4],
            rejected=f"Well, it is hard to say; day {i} was long and I have thought about it a lot.",
        )
        for i in range(4)
    ]


def lora_params(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trl_trainer(model, tokenizer, rows: list[dict], work_dir: Path, captured: dict, base_reference: bool):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class GroveTokenized(DPOTrainer):
        """DPOTrainer on a dataset tokenized already (prompt_ids, chosen_ids, rejected_ids)."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            captured.setdefault("loss", float(loss.detach()))
            return loss

    class Gradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured["grads"] = {name: p.grad.detach().clone() for name, p in lora_params(model).items()}

    config = DPOConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=len(rows),
        max_steps=1,
        learning_rate=1e-3,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_dropout=True,
        seed=0,
    )
    trainer = GroveTokenized(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Gradients()],
    )
    if base_reference and "ref" in model.peft_config:
        model.delete_adapter("ref")
    return trainer


@pytest.mark.parametrize("trained_adapter", [False, True], ids=["new-adapter", "trained-adapter"])
def test_first_step_matches_trl(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, trained_adapter: bool):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    spec = make_spec(dpo={"beta": BETA}, mixed_precision="fp32", compile=False)
    data = finalize_pairs(encode_examples(pairs(), tiny_tokenizer), spec.max_seq_len)
    assert len(data.rows) == 4

    # Grove: its own model setup and step.
    setup = build_model(spec, tiny_model_dir, torch.device("cpu"), "fp32", gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if not trained_adapter:
            assert all(p.abs().max() == 0 for n, p in lora_params(setup.model).items() if "lora_B" in n)
        for name, param in lora_params(setup.model).items():
            if "lora_B" in name and trained_adapter:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    initial = {name: p.detach().clone() for name, p in lora_params(setup.model).items()}
    pad = tiny_tokenizer.pad_token_id if tiny_tokenizer.pad_token_id is not None else tiny_tokenizer.eos_token_id
    trainer = DpoTrainer(setup, pad, RecordingHooks(), BETA)
    loss_sum, correct, n_pairs, _, _ = trainer.train_step([[[row] for row in data.rows]], None)
    grove_loss = loss_sum / n_pairs
    grove_grads = {name: p.grad.detach().clone() for name, p in lora_params(setup.model).items()}

    # TRL: a fresh base, the same adapter weights, the same token ids.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, setup.model.peft_config["default"])
    missing = set(initial) - set(lora_params(model))
    assert not missing, f"adapter parameters named differently: {sorted(missing)[:3]}"
    with torch.no_grad():
        for name, param in lora_params(model).items():
            param.copy_(initial[name])

    def split(row: dict) -> tuple[list[int], list[int]]:
        start = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        return row["input_ids"][:start], row["input_ids"][start:]

    rows = []
    for row in data.rows:
        prompt, chosen = split(row)
        prompt_again, rejected = split(row["rejected"])
        assert prompt == prompt_again
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    captured: dict = {}
    trl_trainer(model, tiny_tokenizer, rows, tmp_path / "trl", captured, base_reference=trained_adapter).train()

    assert captured["loss"] == pytest.approx(grove_loss, rel=1e-5, abs=1e-6)
    log_2 = pytest.approx(0.6931472, abs=1e-5)
    assert (grove_loss != log_2) if trained_adapter else (grove_loss == log_2)
    assert set(captured["grads"]) == set(grove_grads)
    for name, grad in grove_grads.items():
        moves = trained_adapter or "lora_B" in name  # with lora_B zero, lora_A's gradient is zero
        assert (grad.abs().max() > 0) == moves, name
        torch.testing.assert_close(captured["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)

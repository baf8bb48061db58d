"""The training engine on tiny-llama-test: methods, schedule, packing, checkpoints, resume, early stopping."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.datasets import PromptCompletionExample, TextExample
from tests.conftest import write_jsonl
from tests.worker.test_train import RecordingHooks, chat_examples, make_spec
from worker.checkpoints import checkpoint_steps, kept_checkpoints, read_state
from worker.data import (
    IGNORE_INDEX,
    collate,
    collate_packed,
    pack_rows,
    read_training_examples,
    tokenize_examples,
)
from worker.model_setup import merge_model
from worker.token_cache import cache_key, encode_cached, tokenizer_fingerprint
from worker.train import train_adapter
from worker.train_plan import epoch_batches, lr_factor

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def run(base: Path, work: Path, hooks=None, examples=None, valid=None, **spec):
    hooks = hooks or RecordingHooks()
    return train_adapter(make_spec(**spec), base, examples or chat_examples(12), valid, work, hooks), hooks


def adapter_of(outcome) -> dict[str, torch.Tensor]:
    return load_file(str(outcome.adapter_dir / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name
        else:
            assert torch.equal(a[name], b[name]), name


def base_state(tiny_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model_dir / "model.safetensors"))


# --- methods -------------------------------------------------------------------------------------------


def test_qlora_trains_the_adapter_and_keeps_the_base_4bit(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel

    from worker.model_setup import build_model

    spec = make_spec(adapter={"type": "qlora", "r": 4, "target_modules": ["q_proj", "v_proj"]}, max_steps=3)
    outcome, hooks = run(tiny_model_dir, tmp_path, adapter=spec.adapter.model_dump(), max_steps=3)
    assert outcome.steps == 3 and hooks.started[1]["adapter_type"] == "qlora"
    config = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    trained = adapter_of(outcome)
    assert trained and all(torch.count_nonzero(t) > 0 for t in trained.values())

    # The quantized base: 4-bit layers with packed uint8 weights, not touched by training.
    setup = build_model(spec, tiny_model_dir, torch.device("cpu"), "fp32", False)
    layers = [m for m in setup.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in layers)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.dtype == torch.uint8}
    assert before
    model = PeftModel.from_pretrained(setup.model.get_base_model(), str(outcome.adapter_dir))
    after = {n.replace("base_model.model.", "", 1): p for n, p in model.named_parameters() if p.dtype == torch.uint8}
    for name, value in before.items():
        assert torch.equal(value, after[name.replace("base_model.model.", "", 1)]), name


def test_full_fine_tune_changes_the_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    outcome, hooks = run(tiny_model_dir, tmp_path, adapter={"type": "full"}, max_steps=2, learning_rate=1e-3)
    assert hooks.started[1]["lora_rank"] is None
    assert hooks.started[1]["trainable_parameters"] == sum(t.numel() for t in base_state(tiny_model_dir).values())
    model = AutoModelForCausalLM.from_pretrained(str(outcome.adapter_dir), local_files_only=True)
    base = base_state(tiny_model_dir)
    changed = [
        name for name, value in model.state_dict().items() if name in base and not torch.equal(value, base[name])
    ]
    assert set(changed) == set(base)  # every weight moved
    assert (outcome.adapter_dir / "tokenizer.json").is_file()


def test_modules_to_save_train_a_copy_and_leave_the_base(tiny_model_dir, tmp_path):
    outcome, _ = run(
        tiny_model_dir,
        tmp_path,
        max_steps=2,
        adapter={"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    )
    saved = adapter_of(outcome)
    head = [name for name in saved if "lm_head" in name]
    assert head, sorted(saved)
    base = base_state(tiny_model_dir)
    # Tied: the head is the embedding matrix. Its trained copy moved; the base file is what it was.
    assert not torch.equal(saved[head[0]], base["model.embed_tokens.weight"])
    assert all("lora_" in name or "lm_head" in name for name in saved)


def test_bf16_on_cpu_computes_the_adapter_in_bf16_and_saves_fp32_master_weights(tiny_model_dir, tmp_path):
    outcome, hooks = run(tiny_model_dir, tmp_path, max_steps=3, mixed_precision="bf16")
    stats = hooks.started[1]
    assert (stats["mixed_precision"], stats["dtype"], stats["trained_weights_compute_dtype"]) == (
        "bf16",
        "bfloat16",
        "bfloat16",
    )
    assert all(math.isfinite(m["train_loss"]) for _, _, m in hooks.metrics)
    adapter = adapter_of(outcome)
    assert all(t.dtype == torch.float32 for t in adapter.values())
    # The saved weights are the fp32 masters, not the bf16 copies the model computed with.
    trained_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert any(not torch.equal(t, t.bfloat16().float()) for t in trained_b)


def test_bf16_resume_restores_the_fp32_master_weights(tiny_model_dir, tmp_path):
    settings = {"examples": chat_examples(16), "hyperparameters": {"batch_size": 4, "n_epochs": 2}}
    settings |= {"save_every_steps": 2, "seed": 3, "mixed_precision": "bf16"}
    reference, _ = run(tiny_model_dir, tmp_path / "ref", **settings)
    work = tmp_path / "job"
    interrupted, _ = run(tiny_model_dir, work, RecordingHooks(stop_after=5), **settings)
    assert interrupted.stopped and checkpoint_steps(work)[-1] == 4
    shutil.rmtree(work / "adapter")
    resumed, _ = run(tiny_model_dir, work, **settings)
    assert resumed.resumed_from == 4
    assert_same(adapter_of(resumed), adapter_of(reference))


TIMING = {"tokens_per_second", "eta_seconds", "peak_memory_mb"}


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_a_paused_run_resumes_to_the_weights_and_losses_of_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """Paused between two checkpoints (step 3), then at a checkpoint (step 4), then run to the end: the same
    adapter, losses, metrics and kept checkpoints as one run. Dropout and gradient accumulation make the RNG
    state and the step boundary matter."""
    from worker.checkpoints import is_pause_checkpoint

    settings = {"examples": chat_examples(16), "valid": chat_examples(24)[16:], "seed": 5, "save_every_steps": 4}
    settings |= {"hyperparameters": {"batch_size": 4, "n_epochs": 2}, "gradient_accumulation_steps": 2}
    settings |= {"adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}}
    reference, reference_hooks = run(tiny_model_dir, tmp_path / "ref", **settings)
    assert reference.steps == 8 and not reference.paused

    work = tmp_path / "job"
    first, first_hooks = run(tiny_model_dir, work, RecordingHooks(pause_after=3), **settings)
    assert first.paused and first.stopped and first.steps == 3
    assert checkpoint_steps(work) == [3] and is_pause_checkpoint(work, 3)
    assert [c[0] for c in first_hooks.checkpoints] == []  # a pause checkpoint is not published
    assert first_hooks.events[-1][2] == {"step": 3}

    second, second_hooks = run(tiny_model_dir, work, RecordingHooks(pause_after=1), **settings)
    assert second.paused and second.resumed_from == 3 and second.steps == 4
    # Step 4 has its regular checkpoint: that is what the pause keeps, and the pause checkpoint at 3 is pruned.
    assert checkpoint_steps(work) == [4] and not is_pause_checkpoint(work, 4)
    assert "Resumed from where the job paused, after step 3" in second_hooks.events[0][1]

    third, third_hooks = run(tiny_model_dir, work, **settings)
    assert not third.paused and not third.stopped and third.resumed_from == 4 and third.steps == 8
    assert_same(adapter_of(third), adapter_of(reference))
    assert (third.train_loss, third.valid_loss, third.trained_tokens) == (
        reference.train_loss,
        reference.valid_loss,
        reference.trained_tokens,
    )
    assert without_timing(third.metrics_rows) == without_timing(reference.metrics_rows)
    reported = [(s, without_timing([m])) for h in (first_hooks, second_hooks, third_hooks) for s, _, m in h.metrics]
    assert reported == [(s, without_timing([m])) for s, _, m in reference_hooks.metrics]
    assert checkpoint_steps(work) == checkpoint_steps(tmp_path / "ref")


def test_attention_for_the_device_and_length():
    from worker.model_setup import FP32_ATTENTION, attention_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_for(cpu, "bf16", 128) == "eager"
    assert attention_for(cpu, "bf16", 4096) == FP32_ATTENTION
    assert attention_for(cpu, "fp32", 128) == "sdpa"
    assert attention_for(cuda, "bf16", 128) == "sdpa"


def test_eager_attention_keeps_packed_examples_apart_in_the_loss(tiny_model_dir, tiny_tokenizer):
    """The trainer builds the additive block-diagonal mask eager attention needs; a packed micro-batch must
    give the loss of its examples run one at a time."""
    from worker.model_setup import build_model
    from worker.train_step import Trainer as _Trainer

    spec = make_spec(max_seq_len=64)
    setup = build_model(spec, tiny_model_dir, torch.device("cpu"), "fp32", False, attn="eager")
    setup.model.eval()
    texts = ["The cat sat on the mat.", "Paris is the capital of France, they say.", "Hi there", "One two three"]
    rows = tokenize_examples([TextExample(text=t) for t in texts], tiny_tokenizer, max_seq_len=64).rows
    bins = pack_rows(rows, capacity=40)
    assert any(len(b) > 1 for b in bins)
    trainer = _Trainer(setup, tiny_tokenizer.pad_token_id, RecordingHooks())
    assert trainer.eager
    with torch.no_grad():
        packed_loss, _, n_real, _ = trainer.loss_sums(bins)
        alone = sum(float(trainer.loss_sums([[row]])[0]) for row in rows)
    assert n_real == sum(len(r["input_ids"]) for r in rows)
    assert float(packed_loss) == pytest.approx(alone, rel=1e-5)


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")),
    reason="no C++ compiler (apt-get install g++): torch.compile on CPU builds its kernels with one",
)
def test_compiled_layers_train_like_eager_ones(tiny_model_dir, tmp_path):
    settings = {"max_steps": 3, "seed": 4, "examples": chat_examples(12)}
    plain, h1 = run(tiny_model_dir, tmp_path / "a", compile=False, **settings)
    compiled, h2 = run(tiny_model_dir, tmp_path / "b", compile=True, **settings)
    assert (h1.started[1]["compiled_layers"], h2.started[1]["compiled_layers"]) == (0, 2)
    assert [m["train_loss"] for _, _, m in h1.metrics] == pytest.approx(
        [m["train_loss"] for _, _, m in h2.metrics], rel=1e-4
    )
    assert_same(adapter_of(plain), adapter_of(compiled), atol=1e-4)
    auto, h3 = run(tiny_model_dir, tmp_path / "c", max_steps=2)
    assert h3.started[1]["compiled_layers"] == 0  # auto: too short a run to pay for a compile


def test_fp16_without_cuda_is_a_user_error(tiny_model_dir, tmp_path):
    from models.errors import InvalidRequest

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(InvalidRequest) as error:
        run(tiny_model_dir, tmp_path, max_steps=1, mixed_precision="fp16")
    assert error.value.param == "mixed_precision"


def test_merged_model_matches_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    outcome, _ = run(tiny_model_dir, tmp_path / "work", max_steps=2)
    merged_dir = merge_model(tiny_model_dir, outcome.adapter_dir, "lora", "float32", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True)
    assert not any("lora" in name for name in merged.state_dict())
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True), str(outcome.adapter_dir)
    )
    inputs = torch.tensor([[1, 4093, 198, 33, 34]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=inputs).logits, peft(input_ids=inputs).logits, atol=1e-4)
    half = merge_model(tiny_model_dir, outcome.adapter_dir, "lora", "bfloat16", tmp_path / "merged-bf16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"


# --- schedule ------------------------------------------------------------------------------------------


def test_lr_schedules():
    total = 100
    for kind in ("linear", "cosine", "constant"):
        factors = [lr_factor(s, total, 0.1, kind) for s in range(1, total + 1)]
        assert factors[:10] == pytest.approx([(i + 1) / 11 for i in range(10)])  # warm-up
        assert factors[10] == pytest.approx(1.0)
        assert all(0 <= f <= 1 for f in factors)
    assert lr_factor(total, total, 0.1, "constant") == 1.0
    assert lr_factor(total, total, 0.1, "linear") == pytest.approx(1 / 90)
    assert lr_factor(55, total, 0.1, "cosine") == pytest.approx(0.5, abs=0.02)  # halfway through the decay
    assert lr_factor(1, 10, 0.0, "linear") == 1.0


def test_epoch_batches_are_reproducible_and_group_by_length():
    lengths = [(i * 37) % 101 for i in range(400)]
    one = epoch_batches(lengths, 8, seed=3, epoch=0, by_length=False)
    assert one == epoch_batches(lengths, 8, seed=3, epoch=0, by_length=False)
    assert one != epoch_batches(lengths, 8, seed=3, epoch=1, by_length=False)
    assert sorted(i for b in one for i in b) == list(range(400))
    grouped = epoch_batches(lengths, 8, seed=3, epoch=0, by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(one) / 5


def test_gradient_accumulation_and_packing_do_not_change_the_result(tiny_model_dir, tmp_path):
    # Lengths from 3 to about 40 tokens: padding each to the longest wastes positions; packing does not.
    examples = [PromptCompletionExample(prompt="word " * (1 + (i * 7) % 30), completion=f" {i}") for i in range(16)]
    settings = {"max_steps": 3, "hyperparameters": {"batch_size": 8, "n_epochs": 1}, "seed": 5, "log_every_steps": 1}
    padded, h1 = run(
        tiny_model_dir, tmp_path / "a", examples=examples, packing=False, gradient_accumulation_steps=1, **settings
    )
    accumulated, h2 = run(
        tiny_model_dir, tmp_path / "b", examples=examples, packing=False, gradient_accumulation_steps=4, **settings
    )
    packed, h3 = run(tiny_model_dir, tmp_path / "c", examples=examples, packing=True, **settings)
    assert h2.started[1]["gradient_accumulation_steps"] == 4
    # The same loss at every step; the weights equal but for float rounding (which Adam's normalisation
    # amplifies where a gradient is about 0).
    losses = [[m["train_loss"] for _, _, m in h.metrics] for h in (h1, h2, h3)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert_same(adapter_of(padded), adapter_of(accumulated), atol=1e-3)
    assert_same(adapter_of(padded), adapter_of(packed), atol=1e-3)
    assert h3.metrics[-1][2]["padding_fraction"] < h1.metrics[-1][2]["padding_fraction"]
    assert h1.metrics[-1][2]["padding_fraction"] > 0


def test_gradient_checkpointing_gives_the_same_result(tiny_model_dir, tmp_path):
    plain, h1 = run(tiny_model_dir, tmp_path / "a", max_steps=2, gradient_checkpointing=False)
    checkpointed, h2 = run(tiny_model_dir, tmp_path / "b", max_steps=2, gradient_checkpointing=True)
    assert (h1.started[1]["gradient_checkpointing"], h2.started[1]["gradient_checkpointing"]) == (False, True)
    assert_same(adapter_of(plain), adapter_of(checkpointed), atol=1e-5)
    auto, h3 = run(tiny_model_dir, tmp_path / "c", max_steps=1)
    assert h3.started[1]["gradient_checkpointing"] is False  # a tiny model fits


# --- packing ------------------------------------------------------------------------------------------


def test_packing_never_lets_attention_cross_examples(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True).eval()
    texts = ["The cat sat on the mat.", "Paris is the capital of France, they say.", "Hi", "One two three four five"]
    rows = tokenize_examples([TextExample(text=t) for t in texts], tiny_tokenizer, max_seq_len=64).rows
    bins = pack_rows(rows, capacity=24)
    assert len(bins) < len(rows) and any(len(b) > 1 for b in bins)
    batch = collate_packed(bins, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        for b, members in enumerate(bins):
            at = 0
            for row in members:
                alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
                n = len(row["input_ids"])
                assert torch.allclose(packed[b, at : at + n], alone, atol=1e-5), (b, at)
                at += n
    assert batch["n_real"] == sum(len(r["input_ids"]) for r in rows)
    # Labels travel with their tokens; a row's first token is never a target, so no loss crosses rows.
    starts = (batch["position_ids"] == 0) & (batch["labels"] != IGNORE_INDEX)
    assert not starts.any()


def test_pack_rows_respects_capacity_and_keeps_every_row():
    rows = [{"input_ids": [0] * n, "labels": [0] * n} for n in (10, 3, 7, 12, 5, 1, 8)]
    bins = pack_rows(rows, capacity=12)
    assert all(sum(len(r["input_ids"]) for r in b) <= 12 for b in bins)
    assert sorted(len(r["input_ids"]) for b in bins for r in b) == [1, 3, 5, 7, 8, 10, 12]
    assert len(bins) == 4  # 46 tokens need at least 4 rows of 12
    padded = collate(rows, pad_token_id=0)
    assert padded["input_ids"].shape == (7, 12)


# --- data: completion marker, cache --------------------------------------------------------------------


def test_text_template_marker_trains_only_after_it(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "i feel great", "label": "joy"}])
    examples = read_training_examples(path, "Text: {text}\nEmotion:<|completion|> {label}")
    assert examples == [PromptCompletionExample(prompt="Text: i feel great\nEmotion:", completion=" joy")]
    (row,) = tokenize_examples(examples, tiny_tokenizer, max_seq_len=64).rows
    context = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == IGNORE_INDEX]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(context) == "Text: i feel great\nEmotion:"
    assert tiny_tokenizer.decode(trained) == " joy<|im_end|>"
    # Without the marker the whole text trains.
    (whole,) = read_training_examples(path, "Text: {text}\nEmotion: {label}")
    assert whole == TextExample(text="Text: i feel great\nEmotion: joy")


def test_tokenization_cache_by_content_hash(tiny_model_dir, tiny_tokenizer, tmp_path):
    examples = chat_examples(5)
    calls = []

    def load():
        calls.append(1)
        return examples

    key = cache_key("ab" * 32, None, tokenizer_fingerprint(tiny_model_dir), project_id="proj-a")
    first, hit1 = encode_cached(load, tiny_tokenizer, tmp_path, key)
    second, hit2 = encode_cached(load, tiny_tokenizer, tmp_path, key)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    assert first == second
    assert key != cache_key("ab" * 32, "{x}", tokenizer_fingerprint(tiny_model_dir), project_id="proj-a")
    assert key != cache_key("cd" * 32, None, tokenizer_fingerprint(tiny_model_dir), project_id="proj-a")
    (tmp_path / f"{key}.npz").write_bytes(b"garbage")  # unreadable: encoded again, not trusted
    third, hit3 = encode_cached(load, tiny_tokenizer, tmp_path, key)
    assert (hit3, third) == (False, first)


# --- validation, checkpoints, early stopping, resume ---------------------------------------------------


def test_checkpoints_every_n_steps_keep_last_k_and_best(tiny_model_dir, tmp_path):
    outcome, hooks = run(
        tiny_model_dir,
        tmp_path,
        valid=chat_examples(20)[12:],
        hyperparameters={"batch_size": 4, "n_epochs": 3},
        save_every_steps=2,
        keep_checkpoints=2,
        log_every_steps=100,
    )
    # 3 steps per epoch, 9 steps: every 2 steps, at epoch ends (3, 6, 9) and the last.
    assert [s for s, _, _ in hooks.checkpoints] == [2, 3, 4, 6, 8, 9]
    assert all("full_valid_loss" in m for _, _, m in hooks.checkpoints)
    best = min(hooks.checkpoints, key=lambda c: c[2]["full_valid_loss"])[0]
    assert outcome.best_step == best
    assert checkpoint_steps(tmp_path) == sorted({8, 9, best}) == hooks.kept
    state = read_state(tmp_path / "checkpoints" / "step-9")
    assert state["step"] == 9 and state["data_position"] == {"epoch": 3, "batch": 3}
    assert {"optimizer", "rng", "metrics_rows"} <= set(state)
    # Metrics carry what the progress events need.
    assert {"padding_fraction", "peak_memory_mb", "eta_seconds", "epoch", "tokens_per_second"} <= set(
        hooks.metrics[-1][2]
    )
    assert kept_checkpoints([1, 2, 3, 4], 5, 1, 2) == [1, 4, 5]


def test_result_is_the_best_checkpoint_unless_last_is_asked(tiny_model_dir, tmp_path):
    # Validated on text unlike the training data: the loss falls for a few steps, then rises as the model
    # specialises. The best checkpoint is early.
    unlike = [TextExample(text=f"Zebras {w} quietly under violet umbrellas") for w in ("sleep", "dance", "sing")]
    settings = {
        "valid": unlike * 4,
        "hyperparameters": {"batch_size": 4, "n_epochs": 4},
        "learning_rate": 0.05,
        "save_every_steps": 1,
        "keep_checkpoints": 1,
    }
    best, hooks = run(tiny_model_dir, tmp_path / "best", **settings)
    losses = {s: m["full_valid_loss"] for s, _, m in hooks.checkpoints}
    assert best.best_step == min(losses, key=losses.get) != best.steps
    assert best.result_step == best.best_step
    saved = load_file(str(tmp_path / "best" / "checkpoints" / f"step-{best.best_step}" / "adapter_model.safetensors"))
    assert_same(adapter_of(best), saved)
    last, _ = run(tiny_model_dir, tmp_path / "last", result_adapter="last", **settings)
    assert last.result_step == last.steps
    assert not all(torch.equal(a, b) for a, b in zip(adapter_of(best).values(), adapter_of(last).values(), strict=True))


def test_early_stopping_stops(tiny_model_dir, tmp_path):
    # No decrease can reach the threshold: after the first checkpoint, none improves.
    outcome, hooks = run(
        tiny_model_dir,
        tmp_path,
        valid=chat_examples(20)[12:],
        hyperparameters={"batch_size": 4, "n_epochs": 10},
        save_every_steps=2,
        early_stopping_patience=2,
        early_stopping_threshold=100.0,
    )
    assert outcome.early_stopped and not outcome.stopped
    assert outcome.total_steps == 30 and outcome.steps == 4  # checkpoints at 2 (best), 3, 4: two without gain
    assert outcome.best_step == 2 and outcome.result_step == 2
    assert any(message.startswith("Early stopping at step 4") for _, message, _ in hooks.events)


def test_resume_continues_where_the_last_checkpoint_left(tiny_model_dir, tmp_path):
    # Dropout on: the restored RNG state matters as much as weights, optimizer and data position.
    settings = {
        "examples": chat_examples(16),
        "valid": chat_examples(20)[16:],
        "hyperparameters": {"batch_size": 4, "n_epochs": 3},
        "adapter": {"r": 4, "dropout": 0.2},
        "save_every_steps": 2,
        "seed": 9,
    }
    reference, ref_hooks = run(tiny_model_dir, tmp_path / "ref", **settings)
    # A worker that dies after the checkpoint at step 6 and before step 8's (simulated: stop at step 7,
    # then drop what the stopped run wrote after its last checkpoint).
    work = tmp_path / "job"
    interrupted, _ = run(tiny_model_dir, work, RecordingHooks(stop_after=7), **settings)
    assert interrupted.stopped and interrupted.steps == 7
    assert checkpoint_steps(work)[-1] == 6
    shutil.rmtree(work / "adapter")
    resumed, hooks = run(tiny_model_dir, work, **settings)
    assert resumed.resumed_from == 6 and hooks.started[1]["resumed_from_step"] == 6
    assert resumed.steps == reference.steps == 12
    assert [s for s, _, _ in hooks.checkpoints][0] == 6  # re-offered for publishing, then 8, 10, 12
    assert_same(adapter_of(resumed), adapter_of(reference))
    assert _same_losses(resumed.metrics_rows, reference.metrics_rows)
    assert resumed.trained_tokens == reference.trained_tokens


def _same_losses(a: list[dict], b: list[dict]) -> bool:
    keys = ("step", "train_loss", "valid_loss", "full_valid_loss", "learning_rate", "trained_tokens")
    return [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]


def test_continue_from_an_earlier_adapter(tiny_model_dir, tmp_path):
    first, _ = run(tiny_model_dir, tmp_path / "one", max_steps=2, adapter={"r": 4, "target_modules": ["q_proj"]})
    second = train_adapter(
        make_spec(max_steps=1, learning_rate=1e-9, adapter={"r": 4, "target_modules": ["q_proj"]}),
        tiny_model_dir,
        chat_examples(12),
        None,
        tmp_path / "two",
        RecordingHooks(),
        init_dir=first.adapter_dir,
    )
    # One step at a negligible learning rate: the weights are (almost) those it started from.
    assert_same(adapter_of(second), adapter_of(first), atol=1e-6)


def test_compile_without_a_cxx_compiler_names_compile_or_falls_back(monkeypatch):
    """Where the worker has no C++ compiler, `compile: true` is a user error naming the field; `auto` trains
    uncompiled."""
    from jobs.fine_tune_spec import FineTuneSpec
    from models.errors import InvalidRequest
    from worker import model_setup

    monkeypatch.setattr(shutil, "which", lambda name: None)
    fields = {"model": "tiny-llama-test", "training_file": "file-x"}
    cpu = torch.device("cpu")
    with pytest.raises(InvalidRequest) as refused:
        model_setup.resolve_compile(FineTuneSpec(**fields, compile=True), cpu, 5000, False)
    assert refused.value.param == "compile" and "C++ compiler" in refused.value.message
    assert model_setup.resolve_compile(FineTuneSpec(**fields), cpu, 5000, False) is False

"""The two backends on tiny-llama-test: loss against a hand computation, and identical greedy generations."""

from __future__ import annotations

import pytest

from jobs.evaluation_data import EvalItem
from jobs.evaluation_spec import GenerationSettings
from models.datasets import PromptCompletionExample
from tests.conftest import emotion_rows
from worker.eval_data import loss_row, prompt_ids

EXAMPLES = [("Text: i feel sad\nEmotion:", " sadness"), ("2+2=", " 4"), ("Hello", " world, again")]


@pytest.fixture(scope="module")
def torch_backend(tiny_model):
    from worker.eval_backends import TorchBackend

    return TorchBackend(tiny_model)


@pytest.fixture(scope="module")
def onnx_backend(tiny_onnx):
    from worker.eval_backends import OnnxBackend

    return OnnxBackend(tiny_onnx)


def _item(i: int, prompt: str, completion: str) -> EvalItem:
    return EvalItem(
        i, i + 1, PromptCompletionExample(prompt, completion), completion.strip(), completion.strip(), prompt
    )


def _by_hand(tiny_model, prompt: str, completion: str) -> tuple[float, int, int]:
    """Summed -log p(completion token | everything before), over the completion and EOS; argmax hits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([context + target])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    total, hits = 0.0, 0
    for k, token in enumerate(target):
        position = len(context) + k - 1
        total -= float(log_probs[position, token])
        hits += int(logits[position].argmax()) == token
    return total, len(target), hits


@pytest.mark.parametrize("backend", ["torch_backend", "onnx_backend"])
def test_completion_loss_matches_a_hand_computation(request, tiny_model, backend):
    backend = request.getfixturevalue(backend)
    rows = [loss_row(_item(i, p, c), backend.tokenizer, 512)[0] for i, (p, c) in enumerate(EXAMPLES)]
    scores = backend.score(rows)
    for (prompt, completion), score in zip(EXAMPLES, scores, strict=True):
        total, n_tokens, hits = _by_hand(tiny_model, prompt, completion)
        assert score.n_tokens == n_tokens
        assert score.loss_sum == pytest.approx(total, rel=1e-4)
        assert score.n_correct == hits


def test_pytorch_batched_left_padded_and_onnx_streamed_generate_the_same(torch_backend, onnx_backend):
    items = [_item(i, f"Text: {r['text']}\nEmotion:", f" {r['label']}") for i, r in enumerate(emotion_rows(24))]
    prompts = [prompt_ids(item, torch_backend.tokenizer, 512)[0] for item in items]
    assert len({len(p) for p in prompts}) > 5  # lengths differ: the batches really are padded
    settings = GenerationSettings(max_new_tokens=10, batch_size=8)
    batched = torch_backend.generate(prompts, settings)
    one_by_one = torch_backend.generate(prompts, settings.model_copy(update={"batch_size": 1}))
    streamed = onnx_backend.generate(prompts, settings)
    assert batched == one_by_one == streamed
    assert all(len(ids) == 10 for ids in batched)  # a random model never says EOS here


def test_stop_strings_end_each_example_the_same_way_on_both_backends(torch_backend, onnx_backend):
    from worker.eval_backends import cut_at_stop

    items = [_item(i, f"Text: {r['text']}\nEmotion:", f" {r['label']}") for i, r in enumerate(emotion_rows(12))]
    prompts = [prompt_ids(item, torch_backend.tokenizer, 512)[0] for item in items]
    settings = GenerationSettings(max_new_tokens=10, batch_size=4, stop=["::::", "PrincePrince"])
    batched = torch_backend.generate(prompts, settings)
    assert batched == onnx_backend.generate(prompts, settings)
    for ids in batched:
        text = torch_backend.tokenizer.decode(ids)
        # Generation ended at the token that completed a stop string, and the text is cut before it.
        assert any(text.endswith(s) for s in settings.stop), text
        assert not any(s in torch_backend.tokenizer.decode(ids[:-1]) for s in settings.stop)
        assert cut_at_stop(text, settings.stop) in ("", "Prince")

from __future__ import annotations

import copy

import pytest

from models.datasets import ChatExample, PromptCompletionExample, TextExample
from worker.data import IGNORE_INDEX, chat_segments, collate, tokenize_examples


def trained_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])


def context_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100])


def test_chat_trains_weighted_assistant_turns_only(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?", "weight": 0},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "weight": 1},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    data = tokenize_examples([ChatExample(messages=messages)], tiny_tokenizer, max_seq_len=512)
    assert (data.n_examples, data.n_truncated, data.n_skipped) == (1, 0, 0)
    (row,) = data.rows
    assert trained_text(tiny_tokenizer, row) == "Paris.<|im_end|>Rome.<|im_end|>"
    assert "Hello! How can I help?" in context_text(tiny_tokenizer, row)
    assert "<|im_start|>assistant\n" in context_text(tiny_tokenizer, row)
    # The pieces tokenize exactly as the whole rendered conversation does.
    rendered = tiny_tokenizer.apply_chat_template(
        [{k: v for k, v in m.items() if k != "weight"} for m in messages], tokenize=False
    )
    assert row["input_ids"] == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert "".join(text for text, _ in chat_segments(tiny_tokenizer, messages)) == rendered
    assert data.n_tokens == len(row["input_ids"])
    assert data.n_trainable_tokens == sum(label != IGNORE_INDEX for label in row["labels"])
    # Labels are the tokens themselves where trained (the loss shifts them).
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(row["input_ids"], row["labels"], strict=True))


def test_chat_with_only_unweighted_turns_is_skipped(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]
    data = tokenize_examples([ChatExample(messages=messages)], tiny_tokenizer, max_seq_len=512)
    assert data.rows == []
    assert (data.n_examples, data.n_skipped, data.n_tokens, data.n_trainable_tokens) == (1, 1, 0, 0)


def test_chat_template_that_is_not_prefix_stable_trains_last_turn(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # Hides earlier assistant turns (as reasoning templates drop earlier thoughts): renderings of a
    # conversation's beginning are not prefixes of the whole.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(hidden){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    (row,) = tokenize_examples([ChatExample(messages=messages)], tokenizer, max_seq_len=512).rows
    assert trained_text(tokenizer, row) == "d<|im_end|>"
    assert "(hidden)<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n" in context_text(tokenizer, row)


def test_prompt_completion_trains_completion_and_eos(tiny_tokenizer):
    example = PromptCompletionExample(prompt="Q: What is 2+2?\nA:", completion=" 4")
    data = tokenize_examples([example], tiny_tokenizer, max_seq_len=512)
    (row,) = data.rows
    assert trained_text(tiny_tokenizer, row) == " 4<|im_end|>"
    assert context_text(tiny_tokenizer, row) == "Q: What is 2+2?\nA:"
    assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert data.n_trainable_tokens == len(tiny_tokenizer(" 4").input_ids) + 1


def test_text_trains_everything_after_the_first_token(tiny_tokenizer):
    data = tokenize_examples([TextExample(text="The cat sat on the mat.")], tiny_tokenizer, max_seq_len=512)
    (row,) = data.rows
    assert tiny_tokenizer.decode(row["input_ids"]) == "The cat sat on the mat.<|im_end|>"
    # Nothing precedes the first token (SmolLM2 adds no BOS), so it is never a target.
    assert row["labels"][0] == IGNORE_INDEX
    assert row["labels"][1:] == row["input_ids"][1:]
    assert data.n_trainable_tokens == len(row["input_ids"]) - 1


def test_truncation_is_counted(tiny_tokenizer):
    examples = [
        TextExample(text="word " * 100),
        PromptCompletionExample(prompt="short", completion=" answer"),
        # The completion lies beyond max_seq_len: nothing left to train on.
        PromptCompletionExample(prompt="word " * 100, completion=" cut"),
    ]
    data = tokenize_examples(examples, tiny_tokenizer, max_seq_len=16)
    assert data.n_examples == 3
    assert data.n_truncated == 2
    assert data.n_skipped == 1
    assert len(data.rows) == 2
    assert len(data.rows[0]["input_ids"]) == 16 == len(data.rows[0]["labels"])
    assert data.n_tokens == sum(len(r["input_ids"]) for r in data.rows)


def test_collate_pads_right(tiny_tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = collate(rows, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_unknown_example_type(tiny_tokenizer):
    with pytest.raises(TypeError):
        tokenize_examples([{"text": "dict is not an example"}], tiny_tokenizer, max_seq_len=32)

"""Evaluation items as token ids: the loss rows and the generation prompts, tokenized as in training.

The items come from jobs/evaluation_data.py (torch-free, shared with the API's checks at creation).
"""

from __future__ import annotations

from jobs.evaluation_data import EvalItem


def loss_row(item: EvalItem, tokenizer, max_seq_len: int) -> tuple[dict | None, bool]:
    """({input_ids, labels} or None when no completion token fits, whether it was cut) for the loss."""
    from worker.data import tokenize_examples

    data = tokenize_examples([item.example], tokenizer, max_seq_len)
    return (data.rows[0] if data.rows else None), bool(data.n_truncated)


def prompt_ids(item: EvalItem, tokenizer, max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Token ids the model continues (as in training: the same prefix and tokenization), left-cut to fit."""
    from worker.data import _special_prefix, _token_ids

    if item.messages is not None:
        text = tokenizer.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True)
        ids = _token_ids(tokenizer, text)
    else:
        ids = _special_prefix(tokenizer) + _token_ids(tokenizer, item.prompt or "")
    if not ids:
        ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    cut = len(ids) > max_prompt_tokens
    return (ids[-max_prompt_tokens:] if cut else ids), cut

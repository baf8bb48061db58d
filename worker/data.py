"""Turn training examples into token ids and loss labels, and batch them.

Labels follow the Hugging Face convention: `labels[i]` is the target for position i, predicted from the
tokens before it (the loss shifts by one), and IGNORE_INDEX marks tokens that are context only.

- chat: loss on the assistant messages whose `weight` is not 0, from the first content token through the
  turn's end token (e.g. `<|im_end|>`). The role header (the generation prompt) and everything else is
  context. Message boundaries come from rendering prefixes of the conversation with the chat template.
- prompt/completion: loss on the completion tokens and a final EOS.
- text: loss on the whole text and a final EOS.

Examples longer than max_seq_len are cut at max_seq_len and counted; an example left with no trained token
(every assistant turn weighted 0, or cut off) is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.datasets import ChatExample, Example, PromptCompletionExample, TextExample

IGNORE_INDEX = -100


@dataclass
class TokenizedData:
    rows: list[dict] = field(default_factory=list)  # {"input_ids": list[int], "labels": list[int]}
    n_examples: int = 0  # examples given
    n_truncated: int = 0  # examples longer than max_seq_len, cut to it
    n_skipped: int = 0  # examples without any trained token (not in rows)
    n_tokens: int = 0  # tokens in rows
    n_trainable_tokens: int = 0  # tokens in rows with a label

    def stats(self) -> dict:
        return {
            "n_examples": self.n_examples,
            "n_truncated": self.n_truncated,
            "n_skipped": self.n_skipped,
            "n_tokens": self.n_tokens,
            "n_trainable_tokens": self.n_trainable_tokens,
        }


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be split into messages (or there is none)."""


def _token_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before a text on its own (e.g. Llama's BOS); empty for SmolLM2."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _trained(message: dict) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces whose concatenation is the full rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the base model's tokenizer has no chat template")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    try:
        return _segments_by_prefix(tokenizer, messages, clean)
    except ChatTemplateError:
        # Some templates render earlier turns differently (e.g. drop reasoning): train the last turn only.
        return _segments_last_turn(tokenizer, messages, clean)


def _assistant_pieces(prompt: str, full: str, trained: bool) -> list[tuple[str, bool]]:
    body = full[len(prompt) :]
    generated = body.rstrip()  # keep the end token; whitespace after it is template layout
    return [(generated, trained), (body[len(generated) :], False)]


def _segments_by_prefix(tokenizer, messages: list[dict], clean: list[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        full = _render(tokenizer, clean[: i + 1], False)
        if message.get("role") == "assistant":
            prompt = _render(tokenizer, clean[:i], True)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ChatTemplateError(f"chat template rendering of message {i} is not prefix-stable")
            segments.append((prompt[len(done) :], False))
            segments += _assistant_pieces(prompt, full, _trained(message))
        else:
            if not full.startswith(done):
                raise ChatTemplateError(f"chat template rendering of message {i} is not prefix-stable")
            segments.append((full[len(done) :], False))
        done = full
    return segments


def _segments_last_turn(tokenizer, messages: list[dict], clean: list[dict]) -> list[tuple[str, bool]]:
    last = max((i for i, m in enumerate(messages) if _trained(m)), default=None)
    if last is None:
        return [(_render(tokenizer, clean, False), False)]
    prompt = _render(tokenizer, clean[:last], True)
    full = _render(tokenizer, clean[: last + 1], False)
    if not full.startswith(prompt):
        raise ChatTemplateError("the chat template does not render an assistant turn after its generation prompt")
    return [(prompt, False), *_assistant_pieces(prompt, full, True)]


def _encode(example: Example, tokenizer, prefix: list[int]) -> tuple[list[int], list[int]]:
    if isinstance(example, ChatExample):
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in chat_segments(tokenizer, example.messages):
            ids = _token_ids(tokenizer, text)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        return input_ids, labels
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    if isinstance(example, PromptCompletionExample):
        # Prompt and completion are tokenized apart, as the prompt is at inference.
        context = prefix + _token_ids(tokenizer, example.prompt)
        target = _token_ids(tokenizer, example.completion) + [eos]
    elif isinstance(example, TextExample):
        context = list(prefix)
        target = _token_ids(tokenizer, example.text) + [eos]
    else:
        raise TypeError(f"unsupported example type {type(example).__name__}")
    return context + target, [IGNORE_INDEX] * len(context) + target


def tokenize_examples(examples: list[Example], tokenizer, max_seq_len: int) -> TokenizedData:
    data = TokenizedData(n_examples=len(examples))
    prefix = _special_prefix(tokenizer)
    for example in examples:
        input_ids, labels = _encode(example, tokenizer, prefix)
        if len(input_ids) > max_seq_len:
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
            data.n_truncated += 1
        if labels:
            labels[0] = IGNORE_INDEX  # nothing precedes the first token: it is never a target
        n_trainable = sum(label != IGNORE_INDEX for label in labels)
        if n_trainable == 0:
            data.n_skipped += 1
            continue
        data.rows.append({"input_ids": input_ids, "labels": labels})
        data.n_tokens += len(input_ids)
        data.n_trainable_tokens += n_trainable
    return data


def collate(rows: list[dict], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch to its longest row: input_ids, labels (IGNORE_INDEX padding), attention_mask."""
    import torch

    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

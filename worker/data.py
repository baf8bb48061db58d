"""Turn training examples into token ids and loss labels, and batch them.

Labels follow the Hugging Face convention: `labels[i]` is the target for position i, predicted from the
tokens before it (the loss shifts by one), and IGNORE_INDEX marks tokens that are context only.

- chat: loss on the assistant messages whose `weight` is not 0, from the first content token through the
  turn's end token (e.g. `<|im_end|>`). The role header (the generation prompt) and everything else is
  context. Message boundaries come from rendering prefixes of the conversation with the chat template.
- prompt/completion: loss on the completion tokens and a final EOS.
- preference (DPO): two sequences per pair, the prompt (the chat template over input.messages, with the
  generation prompt) followed by the preferred or the non-preferred reply through its end token; labels on the
  reply only. Encoded as two consecutive entries, paired again by finalize_pairs.
- text: loss on the whole text and a final EOS. A text_template with the completion marker
  (jobs.fine_tune_spec.COMPLETION_MARKER) gives prompt/completion examples instead (read_training_examples).

Examples longer than max_seq_len are cut at max_seq_len and counted; an example left with no trained token
(every assistant turn weighted 0, or cut off) is skipped and counted.

Encoding (encode_examples) is kept apart from cutting (finalize), so that a file's encoding can be cached
(worker/token_cache.py) and serve any max_seq_len. Batches are padded (collate) or packed: several examples per
row, positions restarting, a block-diagonal causal mask (pack_rows, collate_packed).

Reading and encoding take a `check_stop` callable, called before each example (and each chat message), that
raises to abandon the work: a cancel reaches a job while it prepares a large file, not only between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.fine_tune_spec import split_at_completion_marker
from models.config import get_settings
from models.datasets import (
    ChatExample,
    Example,
    PreferenceExample,
    PromptCompletionExample,
    TextExample,
    example_too_large,
    read_examples,
)

IGNORE_INDEX = -100

StopCheck = Callable[[], None]  # raises (worker.stage_kit.Stopped) to abandon the work


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


def chat_segments(tokenizer, messages: list[dict], check_stop: StopCheck | None = None) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces whose concatenation is the full rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the base model's tokenizer has no chat template")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    try:
        return _segments_by_prefix(tokenizer, messages, clean, check_stop)
    except ChatTemplateError:
        # Some templates render earlier turns differently (e.g. drop reasoning): train the last turn only.
        return _segments_last_turn(tokenizer, messages, clean)


def _assistant_pieces(prompt: str, full: str, trained: bool) -> list[tuple[str, bool]]:
    body = full[len(prompt) :]
    generated = body.rstrip()  # keep the end token; whitespace after it is template layout
    return [(generated, trained), (body[len(generated) :], False)]


def _segments_by_prefix(
    tokenizer, messages: list[dict], clean: list[dict], check_stop: StopCheck | None
) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if check_stop is not None:  # each message renders the whole conversation so far: long ones take a while
            check_stop()
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


def _encode(
    example: Example, tokenizer, prefix: list[int], check_stop: StopCheck | None
) -> tuple[list[int], list[int]]:
    if isinstance(example, ChatExample):
        input_ids: list[int] = []
        labels: list[int] = []
        for text, trained in chat_segments(tokenizer, example.messages, check_stop):
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


def _encode_preference(example: PreferenceExample, tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the preferred, then the non-preferred reply, each after the same prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError("the base model's tokenizer has no chat template")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in example.messages]
    prompt = _render(tokenizer, clean, True)
    prompt_ids = _token_ids(tokenizer, prompt)
    encoded = []
    for reply in (example.chosen, example.rejected):
        full = _render(tokenizer, [*clean, {"role": "assistant", "content": reply}], False)
        if not full.startswith(prompt):
            raise ChatTemplateError("the chat template does not render an assistant turn after its generation prompt")
        # The reply through its end token; the template's layout after it is neither context nor trained.
        (generated, _), _ = _assistant_pieces(prompt, full, True)
        reply_ids = _token_ids(tokenizer, generated)
        encoded.append((prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids))
    return encoded


def encode_examples(
    examples: Sequence[Example], tokenizer, check_stop: StopCheck | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example, whole (not yet cut to any max_seq_len); two per preference pair."""
    prefix = _special_prefix(tokenizer)
    encoded = []
    for example in examples:
        if check_stop is not None:
            check_stop()
        if isinstance(example, PreferenceExample):
            encoded += _encode_preference(example, tokenizer)
        else:
            encoded.append(_encode(example, tokenizer, prefix, check_stop))
    return encoded


def finalize(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_len: int) -> TokenizedData:
    """Cut encoded examples to max_seq_len (counted), never train on a first token, drop untrainable ones."""
    data = TokenizedData(n_examples=len(encoded))
    for ids, labs in encoded:
        input_ids, labels = list(ids), list(labs)
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


def finalize_pairs(encoded: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_len: int) -> TokenizedData:
    """Preference pairs (consecutive entries of encode_examples) as rows: the preferred sequence's input_ids
    and labels, and the non-preferred one under "rejected". Each is cut to max_seq_len (the pair counted once);
    a pair that loses every trained token of either reply is skipped."""
    if len(encoded) % 2:
        raise ValueError("preference data encodes to pairs of sequences; got an odd number")
    data = TokenizedData(n_examples=len(encoded) // 2)
    for i in range(0, len(encoded), 2):
        pair = []
        for ids, labs in (encoded[i], encoded[i + 1]):
            one = finalize([(ids, labs)], max_seq_len)
            pair.append(one.rows[0] if one.rows else None)
        cut = any(len(ids) > max_seq_len for ids, _ in encoded[i : i + 2])
        data.n_truncated += cut
        if pair[0] is None or pair[1] is None:
            data.n_skipped += 1
            continue
        chosen, rejected = pair
        data.rows.append({**chosen, "rejected": rejected})
        for row in pair:
            data.n_tokens += len(row["input_ids"])
            data.n_trainable_tokens += sum(label != IGNORE_INDEX for label in row["labels"])
    return data


def tokenize_examples(
    examples: list[Example], tokenizer, max_seq_len: int, check_stop: StopCheck | None = None
) -> TokenizedData:
    return finalize(encode_examples(examples, tokenizer, check_stop), max_seq_len)


# --- reading a file for training ----------------------------------------------------------------------


def read_training_examples(
    path: Path, text_template: str | None, file_param: str = "training_file", check_stop: StopCheck | None = None
) -> list[Example]:
    """The file's examples (models.datasets.read_examples: each at most max_example_chars long, a user error
    naming `file_param` or the template otherwise). A text_template with the completion marker gives
    prompt/completion examples: the text before the marker is context, the text after it is trained on."""
    parts = split_at_completion_marker(text_template)
    if parts is None:
        return read_examples(path, text_template, file_param=file_param, check_stop=check_stop)
    # Each half is held to the limit as it is read, so that neither is built past it; then the two together.
    prompts = read_examples(path, parts[0], file_param=file_param, check_stop=check_stop)
    completions = read_examples(path, parts[1], file_param=file_param, check_stop=check_stop)
    limit = get_settings().max_example_chars
    examples: list[Example] = []
    for index, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if len(p.text) + len(c.text) > limit:
            chars = len(p.text) + len(c.text)
            raise example_too_large(_line_of(path, index), file_param, chars, limit, by_template=True)
        examples.append(PromptCompletionExample(prompt=p.text, completion=c.text))
    return examples


def _line_of(path: Path, index: int) -> int:
    """The line number of the file's example number `index` (from 0): blank lines hold none."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                index -= 1
                if index < 0:
                    return line_no
    raise IndexError(index)


# --- batching ----------------------------------------------------------------------------------------------


def pack_rows(rows: Sequence[dict], capacity: int) -> list[list[dict]]:
    """Rows grouped into as few bins of at most `capacity` tokens as a balanced split allows.

    The bins are filled longest row first, each into the emptiest bin (so they end up about equally long,
    and the batch they form needs little padding); with k = ceil(tokens / capacity) bins to start with, and
    one more whenever a row does not fit. A row longer than `capacity` gets a bin of its own.
    """
    lengths = [len(row["input_ids"]) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    n_bins = max(1, math.ceil(sum(min(n, capacity) for n in lengths) / capacity))
    while True:
        bins: list[list[int]] = [[] for _ in range(n_bins)]
        load = [0] * n_bins
        for i in order:
            b = min(range(n_bins), key=lambda j: (load[j], j))
            if load[b] and load[b] + lengths[i] > capacity:
                break
            bins[b].append(i)
            load[b] += lengths[i]
        else:
            return [[rows[i] for i in b] for b in bins if b]
        n_bins += 1


def collate_packed(bins: Sequence[Sequence[dict]], pad_token_id: int) -> dict[str, Any]:
    """One sequence per bin: its rows back to back, right-padded to the longest bin.

    position_ids restart at 0 for every row, and `attention_mask` is a 4-D boolean mask (batch, 1, query,
    key) that lets a token see only earlier tokens of its own row, so packed examples never attend to
    each other. Padding forms a segment of its own. Also returns `n_real` (tokens that are not padding).
    """
    import torch

    length = max(sum(len(row["input_ids"]) for row in rows) for rows in bins)
    input_ids = torch.full((len(bins), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(bins), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(bins), length), dtype=torch.long)
    segments = torch.zeros((len(bins), length), dtype=torch.long)
    n_real = 0
    for b, rows in enumerate(bins):
        at = 0
        for s, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, at : at + n] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[b, at : at + n] = torch.tensor(row["labels"], dtype=torch.long)
            position_ids[b, at : at + n] = torch.arange(n)
            segments[b, at : at + n] = s
            at += n
        n_real += at
        position_ids[b, at:] = torch.arange(length - at)
        segments[b, at:] = len(rows)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": mask[:, None],
        "n_real": n_real,
    }


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

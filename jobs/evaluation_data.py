"""Evaluation data: split each example of a file into a prompt and a reference, and tokenize it.

Torch-free: jobs/evaluation.py reads files with `read_items` to refuse what cannot be scored, at creation;
the worker (worker/eval_data.py) tokenizes the same items.

- prompt/completion: the prompt; the completion is the reference.
- chat: every message before the last is the prompt (rendered with the chat template and its generation
  prompt); the last message, which must be the assistant's, is the reference.
- fields + text_template: the text before the template's last field is the prompt; the last field and
  any text after it is the completion. Whitespace at the end of the prompt moves to the completion, so
  "Emotion: {label}" prompts with "Emotion:" and expects " joy", tokenized as in training.

Loss uses worker/data.py's tokenization and masking unchanged (a prompt/completion example for templates,
the conversation for chat), so it is the loss training reports, on the completion tokens only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from jobs.evaluation_spec import EvaluationSettings
from models.datasets import (
    ChatExample,
    DatasetError,
    Example,
    PromptCompletionExample,
    _records,
    _shape_of,
    parse_template,
    render_template,
)
from models.errors import InvalidRequest

MAX_DERIVED_LABELS = 50
MAX_LABEL_CHARS = 64


@dataclass
class EvalItem:
    index: int  # 0-based position among the evaluated examples
    line: int  # line in the file
    example: Example  # what the loss is computed on
    reference: str  # the expected completion, whitespace-stripped
    label: str  # the reference as a label (a template's last field value, else the reference)
    prompt: str | None = None  # a plain-text prompt, or
    messages: list[dict] | None = None  # a chat prompt (rendered with the generation prompt)

    def prompt_text(self) -> str:
        if self.messages is not None:
            return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in self.messages)
        return self.prompt or ""


def split_record(template: str, record: dict, line: int) -> tuple[str, str, str]:
    """(prompt, completion, value of the last field) of one record."""
    parts = parse_template(template)
    fields = [i for i, (_, name) in enumerate(parts) if name is not None]
    if not fields:
        raise InvalidRequest("text_template names no field", param="text_template")
    last = fields[-1]
    try:
        prompt = render_template(parts[:last], record) + parts[last][0]
        completion = render_template([("", parts[last][1]), *parts[last + 1 :]], record)
    except KeyError as exc:
        raise DatasetError(f"text_template field {exc} missing", line, param="evaluation_file") from None
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"text_template cannot render this line: {exc}", line, param="evaluation_file") from None
    trimmed = prompt.rstrip(" \t")
    completion = prompt[len(trimmed) :] + completion
    return trimmed, completion, str(record[parts[last][1]])


def _as_chat(prompt: str, completion: str) -> ChatExample:
    return ChatExample(
        messages=[{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": completion.strip()}]
    )


def preferred_conversation(record: dict) -> list[dict]:
    return [*record["input"]["messages"], *record["preferred_output"]]


def read_items(path: Path, settings: EvaluationSettings) -> list[EvalItem]:
    """Every scored example of the file (the first `max_examples`); raises a 400 naming a bad line."""
    items: list[EvalItem] = []
    limit = settings.max_examples
    for line, record in _records(path):
        if limit is not None and len(items) >= limit:
            break
        index = len(items)
        shape = _shape_of(record)
        if shape in ("chat", "preference"):
            if settings.text_template:
                raise InvalidRequest(
                    f"text_template applies only to files of arbitrary fields; the evaluation_file is {shape} data.",
                    param="text_template",
                )
            # A preference pair is scored as the conversation ending in its preferred reply.
            messages = record["messages"] if shape == "chat" else preferred_conversation(record)
            if not messages or messages[-1].get("role") != "assistant":
                raise DatasetError(
                    "the last message must be the assistant's: it is the reference the model is scored against",
                    line,
                    param="evaluation_file",
                )
            clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
            reference = str(messages[-1].get("content", "")).strip()
            items.append(
                EvalItem(index, line, ChatExample(messages=messages), reference, reference, messages=clean[:-1])
            )
            continue
        if shape == "prompt_completion":
            if settings.text_template:
                raise InvalidRequest(
                    "text_template applies only to files of arbitrary fields; the evaluation_file is "
                    "prompt/completion data.",
                    param="text_template",
                )
            prompt, completion = record["prompt"], record["completion"]
            label = completion.strip()
        else:
            if not settings.text_template:
                raise InvalidRequest(
                    f"The evaluation_file holds arbitrary fields ({', '.join(sorted(record))}); a text_template "
                    "is required to split them into a prompt and the expected completion.",
                    param="text_template",
                )
            prompt, completion, label = split_record(settings.text_template, record, line)
            label = label.strip()
        reference = completion.strip()
        if not reference:
            raise DatasetError("the expected completion is empty: nothing to score", line, param="evaluation_file")
        if settings.use_chat_template:
            example = _as_chat(prompt, completion)
            items.append(EvalItem(index, line, example, reference, label, messages=example.messages[:-1]))
        else:
            items.append(EvalItem(index, line, PromptCompletionExample(prompt, completion), reference, label, prompt))
    if not items:
        raise DatasetError("the evaluation_file has no examples", param="evaluation_file")
    return items


def label_set(items: list[EvalItem], settings: EvaluationSettings) -> list[str]:
    """The labels `accuracy` reads; refuses data that is not a label task (400 naming the field)."""
    given = settings.labels.labels
    fold = (lambda s: s) if settings.labels.case_sensitive else str.casefold
    if given is not None:
        known = {fold(label) for label in given}
        for item in items:
            if fold(item.label) not in known:
                raise InvalidRequest(
                    f"line {item.line}: the reference {item.label[:80]!r} is not one of labels.labels "
                    f"({', '.join(given)}).",
                    param="labels.labels",
                )
        return list(given)
    counts = Counter(item.label for item in items)
    is_label_task = (
        len(counts) <= MAX_DERIVED_LABELS
        and len(counts) < len(items)
        and all(label and len(label) <= MAX_LABEL_CHARS and "\n" not in label for label in counts)
    )
    if not is_label_task:
        raise InvalidRequest(
            f"accuracy needs a label task, and the references of this evaluation_file are free text "
            f"({len(counts)} distinct values in {len(items)} examples). Give the label set in labels.labels, or "
            "use exact_match, rouge_l or bleu.",
            param="metrics",
        )
    by_fold: dict[str, str] = {}
    for label, _ in counts.most_common():
        by_fold.setdefault(fold(label), label)
    return list(by_fold.values())


# --- tokenization (needs a tokenizer; imported lazily by the worker) --------------------------------------

"""Training data: JSONL validation at upload, and reading examples back in the worker.

Four shapes are accepted, decided by the first example and required of every line after it:
- chat: {"messages": [{"role": ..., "content": ..., "weight": 0|1}, ...]}
- prompt/completion: {"prompt": "...", "completion": "..."}
- preference (OpenAI's DPO format): {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  "content": ...}], "non_preferred_output": [{"role": "assistant", "content": ...}]}
- fields: any JSON object, rendered to text by the job's `text_template`.

An upload's errors name their lines: the first MAX_LINE_ERRORS of them, and how many more there are. Each error
shows at most MAX_SHOWN characters of a value from the file (and a list of the file's fields at most
MAX_FIELDS_SHOWN names), so that the answer stays small whatever the file.
"""

from __future__ import annotations

import json
import string
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.errors import InvalidRequest

DatasetFormat = Literal["chat", "prompt_completion", "preference", "fields"]
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
ROLES = {"system", "user", "assistant", "tool", "developer"}
MAX_LINE_ERRORS = 20
MAX_SHOWN = 40
MAX_FIELDS_SHOWN = 20


@dataclass(frozen=True)
class ChatExample:
    messages: list[dict]


@dataclass(frozen=True)
class PromptCompletionExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PreferenceExample:
    """A DPO pair: the conversation so far, and the preferred and non-preferred assistant replies to it."""

    messages: list[dict]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TextExample:
    """A fields row rendered by a text template; the whole text is trained on."""

    text: str


Example = ChatExample | PromptCompletionExample | PreferenceExample | TextExample


@dataclass
class DatasetSummary:
    format: DatasetFormat
    n_examples: int
    # Keys present on every line: the only names a text template may use.
    fields: list[str] = field(default_factory=list)


class DatasetError(InvalidRequest):
    def __init__(self, message: str, line: int | None = None, param: str = "file"):
        self.line = line
        super().__init__(f"line {line}: {message}" if line else message, param=param, code="invalid_file")


def _clipped(text: str) -> str:
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _shown(value: object) -> str:
    """A value from a file as an error message quotes it: a string's repr or a number, cut to MAX_SHOWN
    characters; an array or object by its kind alone."""
    if isinstance(value, str):
        return repr(value[:MAX_SHOWN]) + ("..." if len(value) > MAX_SHOWN else "")
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    return _clipped(repr(value))


class LineErrors:
    """The errors of a file's lines, kept up to MAX_LINE_ERRORS and counted beyond."""

    def __init__(self) -> None:
        self.kept: list[DatasetError] = []
        self.count = 0

    def add(self, error: DatasetError) -> None:
        self.count += 1
        if len(self.kept) < MAX_LINE_ERRORS:
            self.kept.append(error)

    def raise_any(self) -> None:
        if not self.kept:
            return
        if self.count == 1:
            raise self.kept[0]
        message = "; ".join(error.message for error in self.kept)
        if self.count > len(self.kept):
            message += f"; and {self.count - len(self.kept):,} more bad lines ({self.count:,} in all)"
        error = DatasetError(message)
        error.line = self.kept[0].line
        raise error


def _shape_of(record: dict) -> DatasetFormat:
    if any(key in record for key in PREFERENCE_KEYS):
        return "preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return "fields"


def _check_chat(record: dict, line: int) -> None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError("'messages' must be a non-empty list", line)
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(f"messages[{i}] must be an object", line)
        role = message.get("role")
        if role is None:
            raise DatasetError(f"messages[{i}] is missing key 'role'", line)
        if role not in ROLES:
            raise DatasetError(f"messages[{i}] has unknown role {_shown(role)}", line)
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"messages[{i}] is missing key 'content' (a string)", line)
        if "weight" in message and message["weight"] not in (0, 1):
            raise DatasetError(f"messages[{i}].weight must be 0 or 1", line)
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        raise DatasetError("no assistant message", line)


def _check_messages(messages: object, where: str, line: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where} must be a non-empty list", line)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}[{i}] must be an object", line)
        role = message.get("role")
        if role not in ROLES:
            raise DatasetError(
                f"{where}[{i}] has unknown role {_shown(role)}" if role else f"{where}[{i}] is missing key 'role'", line
            )
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"{where}[{i}] is missing key 'content' (a string)", line)


def _check_preference(record: dict, line: int) -> None:
    for key in PREFERENCE_KEYS:
        if key not in record:
            raise DatasetError(f"missing key {key!r} (a preference example has {', '.join(PREFERENCE_KEYS)})", line)
    prompt = record["input"]
    if not isinstance(prompt, dict) or "messages" not in prompt:
        raise DatasetError("'input' must be an object with 'messages'", line)
    _check_messages(prompt["messages"], "input.messages", line)
    for key in PREFERENCE_KEYS[1:]:
        output = record[key]
        if not isinstance(output, list) or len(output) != 1:
            raise DatasetError(f"{key!r} must be a list of exactly one assistant message", line)
        _check_messages(output, key, line)
        if output[0]["role"] != "assistant":
            raise DatasetError(f"{key}[0] must have role 'assistant', not {_shown(output[0]['role'])}", line)


def _check_prompt_completion(record: dict, line: int) -> None:
    for key in ("prompt", "completion"):
        if key not in record:
            raise DatasetError(f"missing key {key!r}", line)
        if not isinstance(record[key], str):
            raise DatasetError(f"{key!r} must be a string", line)


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, raw


def _record(raw: bytes, line_no: int) -> dict:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"not valid JSON ({exc.__class__.__name__}: {exc})", line_no) from None
    except RecursionError:
        raise DatasetError("arrays and objects are nested too deeply to read", line_no) from None
    except ValueError:  # how json.loads refuses an integer literal past sys.get_int_max_str_digits()
        raise DatasetError(f"a number has more than {sys.get_int_max_str_digits()} digits", line_no) from None
    if not isinstance(record, dict):
        raise DatasetError("each line must be a JSON object", line_no)
    return record


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    for line_no, raw in _lines(path):
        yield line_no, _record(raw, line_no)


def validate_jsonl(path: Path, min_examples: int) -> DatasetSummary:
    """Check every line; raise DatasetError naming the first bad lines (see LineErrors)."""
    shape: DatasetFormat | None = None
    shape_line = 0
    count = 0
    common_keys: set[str] | None = None
    errors = LineErrors()
    for line_no, raw in _lines(path):
        try:
            record = _record(raw, line_no)
            this_shape = _shape_of(record)
            if shape is None:
                shape, shape_line = this_shape, line_no
            elif this_shape != shape:
                raise DatasetError(
                    f"expected a {shape} example like line {shape_line}, found a {this_shape} example", line_no
                )
            if shape == "chat":
                _check_chat(record, line_no)
            elif shape == "prompt_completion":
                _check_prompt_completion(record, line_no)
            elif shape == "preference":
                _check_preference(record, line_no)
            else:
                keys = set(record)
                common_keys = keys if common_keys is None else common_keys & keys
            count += 1
        except DatasetError as error:
            errors.add(error)
    errors.raise_any()
    if shape is None:
        raise DatasetError("file contains no examples")
    if count < min_examples:
        raise DatasetError(f"file has {count} examples; at least {min_examples} are required")
    return DatasetSummary(format=shape, n_examples=count, fields=sorted(common_keys or []))


TemplatePart = tuple[str, str | None]  # literal text, then the field rendered after it (None: none)


def parse_template(template: str) -> list[TemplatePart]:
    """A text template as (literal, field) pairs; raise a 400 naming `text_template` for anything but plain
    `{field}` names. A format spec (`{text:>2000000000}`) would let one template pad a line to gigabytes in
    the worker, a conversion (`{text!r}`) calls repr on user data, attribute or index access would reach into
    objects: all are refused here, the one parser every reader of a template goes through. `{{` and `}}`
    stay literal braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidRequest(f"text_template is not a valid format string: {exc}", param="text_template") from None
    parts: list[TemplatePart] = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            if not name.isidentifier():
                raise InvalidRequest(
                    f"text_template field {{{name}}} must be a plain field name", param="text_template"
                )
            if spec or conversion:
                shown = f"{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}"
                raise InvalidRequest(
                    f"text_template field {{{shown}}} has a format spec or conversion; only plain "
                    f"{{{name}}} is allowed",
                    param="text_template",
                )
        parts.append((literal, name))
    return parts


def render_template(parts: list[TemplatePart], record: dict) -> str:
    """A parsed template filled from one record, each value as str.format would show it with no spec."""
    return "".join(literal + ("" if name is None else format(record[name])) for literal, name in parts)


def template_fields(template: str) -> list[str]:
    """Names a template uses (see `parse_template` for what a field may be); at least one."""
    names = [name for _, name in parse_template(template) if name is not None]
    if not names:
        raise InvalidRequest("text_template names no field", param="text_template")
    return names


def check_template_against(template: str, summary: DatasetSummary, param_file: str) -> None:
    missing = [name for name in template_fields(template) if name not in summary.fields]
    if missing:
        fields = ", ".join(_clipped(name) for name in summary.fields[:MAX_FIELDS_SHOWN]) or "none"
        if len(summary.fields) > MAX_FIELDS_SHOWN:
            fields += f" and {len(summary.fields) - MAX_FIELDS_SHOWN:,} more"
        raise InvalidRequest(
            f"text_template uses field {missing[0]!r}, which the {param_file} lacks on at least one line "
            f"(fields on every line: {fields})",
            param="text_template",
        )


def read_examples(
    path: Path,
    text_template: str | None,
    *,
    max_chars: int | None = None,
    file_param: str = "training_file",
    check_stop: Callable[[], None] | None = None,
) -> list[Example]:
    """Load a validated file as examples. The worker calls this; the file was checked at upload.

    No example may render to more than `max_chars` characters (default: the max_example_chars setting): its
    size is added up from the template's literals and the lengths of the field values it uses before the text
    is built, so that a template repeating a long field never makes the giant string it would describe. One
    over the limit is a user error naming its line: `param` is `file_param` when the fields alone are too
    long, else `text_template`. `check_stop`, called before each line, may raise to abandon the read.
    """
    from models.config import get_settings

    limit = get_settings().max_example_chars if max_chars is None else max_chars
    examples: list[Example] = []
    # Parsed again here, not trusted: a job stored before a rule was added still meets it.
    parts = None if text_template is None else parse_template(text_template)
    literal_chars = sum(len(literal) for literal, _ in parts or [])
    uses = Counter(name for _, name in parts or [] if name is not None)
    for line_no, record in _records(path):
        if check_stop is not None:
            check_stop()
        shape = _shape_of(record)
        if shape == "chat":
            example: Example = ChatExample(messages=record["messages"])
            chars = sum(len(message["content"]) for message in example.messages)
        elif shape == "prompt_completion":
            example = PromptCompletionExample(prompt=record["prompt"], completion=record["completion"])
            chars = len(example.prompt) + len(example.completion)
        elif shape == "preference":
            example = PreferenceExample(
                messages=record["input"]["messages"],
                chosen=record["preferred_output"][0]["content"],
                rejected=record["non_preferred_output"][0]["content"],
            )
            chars = sum(len(m["content"]) for m in example.messages) + len(example.chosen) + len(example.rejected)
        else:
            if parts is None:
                raise DatasetError("this file has arbitrary fields; the job needs a text_template", line_no)
            try:
                # str(value) is what render_template writes for each use of a field (for a str, the str itself).
                value_chars = {name: len(format(record[name])) for name in uses}
            except KeyError as exc:
                raise DatasetError(f"text_template field {exc} missing", line_no) from None
            chars = literal_chars + sum(uses[name] * n for name, n in value_chars.items())
            if chars > limit:
                fields_alone_too_long = sum(value_chars.values()) > limit
                raise example_too_large(line_no, file_param, chars, limit, by_template=not fields_alone_too_long)
            example = TextExample(text=render_template(parts, record))
        if chars > limit:
            raise example_too_large(line_no, file_param, chars, limit, by_template=False)
        examples.append(example)
    return examples


def example_too_large(line_no: int, file_param: str, chars: int, limit: int, by_template: bool) -> InvalidRequest:
    """The user error of an example over the max_example_chars limit: the template's fault or the file's."""
    if by_template:
        what, param = f"the text_template renders this example to {chars:,} characters", "text_template"
    else:
        what, param = f"this example has {chars:,} characters", file_param
    return InvalidRequest(
        f"line {line_no} of the {file_param}: {what}; one example may have at most {limit:,}.",
        param=param,
        code="example_too_large",
    )

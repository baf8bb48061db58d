"""The base of every JSON request body's model: values the service can store, refused where the request comes in.

PostgreSQL refuses a NUL character (`\\u0000`) in text, a lone UTF-16 surrogate (`"\\ud800"`) cannot be encoded
as UTF-8, Python's JSON encoder writes Infinity and NaN, which no JSON reader (PostgreSQL's included) takes back,
and an integer past 64 bits fits no column or counter. Pydantic lets each of them through a `str`, `float`,
`dict` or `Any` field, so they used to be refused later, by the database or the encoder: as a 500, or as a 400
that named no field. `RequestBody` walks the raw input once, before its fields are validated, and refuses the
first such value with a validation error located where it is (`metadata.k`, `fine_tuning.text_template`,
`targets.0.name`), which the API answers as a 400 naming that field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

INT64 = 2**63

Loc = tuple[str | int, ...]


class Found(NamedTuple):
    """Where a value was found (the keys and indexes leading to it), what is wrong with it, and whether it is a
    key of the object at `loc` rather than a value."""

    loc: Loc
    problem: str
    in_key: bool


def find_value(value: Any, problem_of: Callable[[Any], str | None]) -> Found | None:
    """The first value or key in `value` (decoded JSON: dicts, lists, scalars), in document order, for which
    `problem_of` says what is wrong. Walked without recursion: the nesting is the client's to choose."""
    stack: list[tuple[Loc, Any]] = [((), value)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, dict):
            for key in item:
                if (problem := problem_of(key)) is not None:
                    return Found(loc, problem, in_key=True)
            stack.extend(reversed([(loc + (str(key),), child) for key, child in item.items()]))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(loc + (index,), child) for index, child in enumerate(item)]))
        elif (problem := problem_of(item)) is not None:
            return Found(loc, problem, in_key=False)
    return None


def text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which no text may contain"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired UTF-16 surrogate (such as \\ud800), which is not valid Unicode"
    return None


def unstorable(value: Any) -> str | None:
    """What keeps one scalar from being stored, or None."""
    if isinstance(value, str):
        return text_problem(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return "is an integer out of range (it must fit in 64 bits)"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


class RequestBody(BaseModel):
    """A request body's model: refuses NUL characters, unpaired surrogates, non-finite numbers and integers past
    64 bits anywhere in its input (keys included), naming where."""

    @model_validator(mode="before")
    @classmethod
    def _only_storable_values(cls, data: Any) -> Any:
        found = find_value(data, unstorable)
        if found is not None:
            problem = f"has a key that {found.problem}" if found.in_key else found.problem
            # A ValidationError raised here keeps its own location (below this model's), as a field's would.
            error = InitErrorDetails(type=PydanticCustomError("unstorable_value", problem), loc=found.loc, input=data)
            raise ValidationError.from_exception_data(cls.__name__, [error])
        return data

"""Prefixed, time-ordered ids ("ftjob-01J..."): cursor pagination orders by id over the primary key index."""

from __future__ import annotations

import os
import time

# Crockford base32 sorts in the same order as the numbers it encodes.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, rem = divmod(value, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def new_id(prefix: str) -> str:
    millis = time.time_ns() // 1_000_000
    randomness = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}-{_base32(millis, 10)}{_base32(randomness, 16)}"

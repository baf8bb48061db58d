"""The data of one training run: the training and validation examples as token rows (read through the
tokenization cache when they come as a DataSource, which may also carry the stage's stop check), the tokenizer
that encoded them, and the fixed validation subsets that every evaluation of the run reuses."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.fine_tune_spec import FineTuneSpec
from models.datasets import DatasetError, Example
from models.model_store import load_options
from worker.data import TokenizedData, finalize, finalize_pairs
from worker.token_cache import encode_cached

VALID_SAMPLE_ROWS = 32  # the "small batch" of the per-log-step valid_loss: about 1 % of a step's time each
FULL_VALID_MAX_ROWS = 1000


@dataclass
class DataSource:
    """Examples to train or validate on, loaded only if the tokenization cache misses."""

    load: Callable[[], Sequence[Example]]
    cache_key: str | None = None  # worker.token_cache.cache_key(file sha256, template, tokenizer, project)
    # Called before each example is read or encoded; raises to abandon the work (a cancel, a lost lease).
    check_stop: Callable[[], None] | None = None


Examples = Sequence[Example] | DataSource


@dataclass
class TrainingData:
    tokenizer: Any
    pad_token_id: int
    train: TokenizedData
    valid: TokenizedData
    train_cache_hit: bool | None  # None: the examples came as a list, not through the cache
    tokenize_seconds: float

    def validation_rows(self, seed: int) -> tuple[list[dict], list[dict]]:
        """(sample, full): fixed, seeded subsets of the validation rows, so that successive valid losses are
        comparable. The sample is a part of the full set."""
        rows = self.valid.rows
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        sample = [rows[i] for i in sorted(order[:VALID_SAMPLE_ROWS])]
        full = [rows[i] for i in sorted(order[:FULL_VALID_MAX_ROWS])]
        return sample, full


def load_training_data(
    spec: FineTuneSpec, base_dir: Path, train: Examples, valid: Examples | None, cache_dir: Path | None
) -> TrainingData:
    """Tokenize both sets with the base model's tokenizer; a user error if nothing is left to train on."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), **load_options(spec.model, weights=False))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = spec.dpo is not None
    train_data, train_cache_hit = _encode(train, tokenizer, cache_dir, spec.max_seq_len, pairs)
    if not train_data.rows:
        raise DatasetError(
            f"no training example has a token to train on within max_seq_len={spec.max_seq_len} "
            "(assistant messages all weighted 0, or cut off)",
            param="training_file",
        )
    valid_data, _ = _encode(valid, tokenizer, cache_dir, spec.max_seq_len, pairs)
    return TrainingData(tokenizer, pad_token_id, train_data, valid_data, train_cache_hit, time.perf_counter() - started)


def _encode(
    source, tokenizer, cache_dir: Path | None, max_seq_len: int, pairs: bool
) -> tuple[TokenizedData, bool | None]:
    """The rows of a source: single sequences, or preference pairs (`pairs`, a DPO run)."""
    cut = finalize_pairs if pairs else finalize
    if source is None:
        return cut([], max_seq_len), None
    if isinstance(source, DataSource):
        encoded, hit = encode_cached(source.load, tokenizer, cache_dir, source.cache_key, source.check_stop)
        return cut(encoded, max_seq_len), hit
    encoded, hit = encode_cached(lambda: source, tokenizer, None, None)
    return cut(encoded, max_seq_len), None

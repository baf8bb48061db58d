"""Metrics of an evaluation, as plain functions of texts and token counts (no model needed).

- loss: mean cross-entropy per completion token over the whole set (token-weighted, like training's
  valid_loss); perplexity = exp(loss); token_accuracy: share of completion tokens the model ranks first.
- exact_match: share of examples whose normalised generated text equals the normalised reference.
- accuracy: share of examples whose generated text reads as the reference label (prefix or first mention),
  with a confusion matrix (rows: reference label, columns: predicted label or "(none)").
- rouge_l: mean ROUGE-L F-measure (rouge-score, Porter stemming) of each generated text against its reference.
- bleu: corpus BLEU of sacrebleu on its 0-100 scale (default 13a tokenization).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jobs.evaluation_spec import LabelSettings, Normalization

NO_LABEL = "(none)"
DIGITS = 6


def rounded(value: float | None, digits: int = DIGITS) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return round(float(value), digits)


# --- loss -------------------------------------------------------------------------------------------------


@dataclass
class TokenScores:
    """One example's completion tokens: summed cross-entropy, how many, how many ranked first."""

    loss_sum: float
    n_tokens: int
    n_correct: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.n_tokens


def loss_metrics(scores: list[TokenScores | None]) -> dict:
    counted = [s for s in scores if s is not None and s.n_tokens]
    tokens = sum(s.n_tokens for s in counted)
    if not tokens:
        return {"loss": None, "perplexity": None, "token_accuracy": None, "n_tokens": 0}
    loss = sum(s.loss_sum for s in counted) / tokens
    return {
        "loss": rounded(loss),
        "perplexity": rounded(math.exp(loss)) if loss < 700 else None,
        "token_accuracy": rounded(sum(s.n_correct for s in counted) / tokens),
        "n_tokens": tokens,
    }


# --- exact match ------------------------------------------------------------------------------------------


def normalize(text: str, norm: Normalization) -> str:
    if norm.regex:
        match = re.search(norm.regex, text)
        if match:
            text = match.group(1) if match.re.groups else match.group(0)
            text = text or ""
    if norm.strip:
        text = text.strip()
    if norm.lowercase:
        text = text.lower()
    return text


def exact_matches(predictions: list[str], references: list[str], norm: Normalization) -> list[bool]:
    return [normalize(p, norm) == normalize(r, norm) for p, r in zip(predictions, references, strict=True)]


# --- labels -----------------------------------------------------------------------------------------------


def predict_label(text: str, labels: list[str], match: str, case_sensitive: bool = False) -> str | None:
    """The label a generated text gives, or None.

    prefix: the text (leading whitespace aside) starts with the label as a whole word; the longest label wins.
    first_mention: the label whose first whole-word occurrence comes first; at the same place, the longest.
    """
    flags = 0 if case_sensitive else re.IGNORECASE
    if match == "prefix":
        body = text.lstrip()
        for label in sorted(labels, key=len, reverse=True):
            if re.match(re.escape(label) + r"(?!\w)", body, flags):
                return label
        return None
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", text, flags)
        if found and (best is None or (found.start(), -len(label)) < best[:2]):
            best = (found.start(), -len(label), label)
    return best[2] if best else None


def canonical_label(reference: str, labels: list[str], case_sensitive: bool) -> str:
    for label in labels:
        if label == reference or (not case_sensitive and label.casefold() == reference.casefold()):
            return label
    return reference


def label_metrics(predictions: list[str], references: list[str], settings: LabelSettings, labels: list[str]) -> dict:
    """Accuracy under the configured match, both matches side by side, and the confusion matrix."""
    truth = [canonical_label(r, labels, settings.case_sensitive) for r in references]
    rows = list(labels) + [t for t in dict.fromkeys(truth) if t not in labels]
    by_match = {}
    predicted_by_match = {}
    for match in ("prefix", "first_mention"):
        predicted = [predict_label(p, labels, match, settings.case_sensitive) for p in predictions]
        predicted_by_match[match] = predicted
        correct = sum(p == t for p, t in zip(predicted, truth, strict=True))
        by_match[match] = rounded(correct / len(truth)) if truth else None
    predicted = predicted_by_match[settings.match]
    columns = rows + [NO_LABEL]
    matrix = [[0] * len(columns) for _ in rows]
    for p, t in zip(predicted, truth, strict=True):
        matrix[rows.index(t)][columns.index(p if p is not None else NO_LABEL)] += 1
    return {
        "accuracy": by_match[settings.match],
        "match": settings.match,
        "accuracy_by_match": by_match,
        "confusion_matrix": {"labels": rows, "predicted": columns, "matrix": matrix},
        "predicted": predicted,
        "correct": [p == t for p, t in zip(predicted, truth, strict=True)],
    }


# --- overlap ----------------------------------------------------------------------------------------------


def rouge_l_scores(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(target=r, prediction=p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]


def bleu_score(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


# --- comparison -------------------------------------------------------------------------------------------


def comparison_rows(names: list[str], metrics: dict[str, dict], metric_names: list[str]) -> list[dict]:
    """Each later target's metrics against the first target's: value, baseline value, difference."""
    if not names:
        return []
    baseline_name = names[0]
    baseline = metrics.get(baseline_name) or {}
    rows = []
    for name in names[1:]:
        values = metrics.get(name) or {}
        for metric in metric_names:
            value, base = values.get(metric), baseline.get(metric)
            rows.append(
                {
                    "target": name,
                    "metric": metric,
                    "value": value,
                    "baseline_target": baseline_name,
                    "baseline_value": base,
                    "difference": rounded(value - base) if value is not None and base is not None else None,
                }
            )
    return rows

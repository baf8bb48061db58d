"""Each metric against values computed by hand on a few fixed examples; splitting data into prompt/reference."""

from __future__ import annotations

import math

import pytest

from jobs.evaluation_data import label_set, read_items, split_record
from jobs.evaluation_spec import EvaluationSettings, LabelSettings, Normalization
from models.errors import InvalidRequest
from tests.conftest import write_jsonl
from worker.eval_metrics import (
    TokenScores,
    bleu_score,
    comparison_rows,
    exact_matches,
    label_metrics,
    loss_metrics,
    predict_label,
    rouge_l_scores,
)

EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def test_loss_perplexity_token_accuracy_are_token_weighted():
    # Two examples of 2 completion tokens: losses 2.0 (1 right) and 1.0 (2 right); a third had no token.
    found = loss_metrics([TokenScores(2.0, 2, 1), TokenScores(1.0, 2, 2), None])
    assert found["loss"] == pytest.approx(0.75)
    assert found["perplexity"] == pytest.approx(math.exp(0.75), abs=1e-6)
    assert found["token_accuracy"] == pytest.approx(0.75)
    assert found["n_tokens"] == 4
    assert loss_metrics([None])["loss"] is None


def test_exact_match_normalisation():
    gsm = Normalization(regex=r"####\s*(-?[\d,.]+)")
    predictions = ["3 + 4 = 7\n#### 7", "The answer is 7", "#### 8 "]
    references = ["She has 3+4=<<3+4=7>>7\n#### 7"] * 3
    assert exact_matches(predictions, references, gsm) == [True, False, False]
    # A pattern without a group extracts the whole match.
    assert exact_matches(["x = 12 apples"], ["12"], Normalization(regex=r"\d+")) == [True]

    assert exact_matches([" Paris \n"], ["paris"], Normalization(lowercase=True)) == [True]
    assert exact_matches([" Paris \n"], ["paris"], Normalization()) == [False]
    assert exact_matches([" Paris"], ["Paris"], Normalization(strip=False)) == [False]


@pytest.mark.parametrize(
    ("text", "prefix", "first_mention"),
    [
        (" joy", "joy", "joy"),
        ("Joy! What a day", "joy", "joy"),  # case-insensitive by default
        ("joyful", None, None),  # whole words only
        ("I feel joy and love", None, "joy"),
        ("love, not joy", "love", "love"),
        ("The emotion is: anger.", None, "anger"),
        ("nothing here", None, None),
    ],
)
def test_label_is_read_by_prefix_or_first_mention(text, prefix, first_mention):
    assert predict_label(text, EMOTIONS, "prefix") == prefix
    assert predict_label(text, EMOTIONS, "first_mention") == first_mention


def test_longest_label_wins_and_case_sensitivity():
    assert predict_label("very happy", ["very happy", "very"], "prefix") == "very happy"
    assert predict_label("Joy", ["joy", "sadness"], "prefix", case_sensitive=True) is None


def test_accuracy_and_confusion_matrix():
    predictions = ["joy", "I think sadness", "love", "fear."]
    references = ["joy", "sadness", "joy", "fear"]
    labels = ["joy", "sadness", "love", "fear"]
    strict = label_metrics(predictions, references, LabelSettings(), labels)
    assert strict["accuracy"] == 0.5  # joy right, sadness unread, love wrong, fear right
    assert strict["accuracy_by_match"] == {"prefix": 0.5, "first_mention": 0.75}
    assert strict["predicted"] == ["joy", None, "love", "fear"]
    matrix = strict["confusion_matrix"]
    assert matrix["labels"] == labels and matrix["predicted"] == [*labels, "(none)"]
    assert matrix["matrix"] == [
        [1, 0, 1, 0, 0],  # joy: once joy, once love
        [0, 0, 0, 0, 1],  # sadness: no label read
        [0, 0, 0, 0, 0],  # love
        [0, 0, 0, 1, 0],  # fear
    ]
    lenient = label_metrics(predictions, references, LabelSettings(match="first_mention"), labels)
    assert lenient["accuracy"] == 0.75 and lenient["confusion_matrix"]["matrix"][1] == [0, 1, 0, 0, 0]


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat is on the mat" is 5 tokens of 6: P = R = F = 5/6.
    scores = rouge_l_scores(["the cat sat on the mat", "joy"], ["the cat is on the mat", "sadness"])
    assert scores == pytest.approx([5 / 6, 0.0])


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: BLEU = (1/12) ** (1/4).
    assert bleu_score(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    assert bleu_score(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_comparison_rows_are_differences_against_the_first_target():
    metrics = {"base": {"accuracy": 0.25, "loss": 2.0}, "ft": {"accuracy": 0.875, "loss": 0.5}, "onnx": {}}
    rows = comparison_rows(["base", "ft", "onnx"], metrics, ["accuracy", "loss"])
    assert rows == [
        {"target": "ft", "metric": "accuracy", "value": 0.875, "baseline_target": "base", "baseline_value": 0.25,
         "difference": 0.625},
        {"target": "ft", "metric": "loss", "value": 0.5, "baseline_target": "base", "baseline_value": 2.0,
         "difference": -1.5},
        {"target": "onnx", "metric": "accuracy", "value": None, "baseline_target": "base", "baseline_value": 0.25,
         "difference": None},
        {"target": "onnx", "metric": "loss", "value": None, "baseline_target": "base", "baseline_value": 2.0,
         "difference": None},
    ]  # fmt: skip


def test_template_splits_before_its_last_field():
    record = {"text": "i am happy", "label": "joy"}
    assert split_record("Text: {text}\nEmotion: {label}", record, 1) == ("Text: i am happy\nEmotion:", " joy", "joy")
    assert split_record("{{x}} {text} -> {label}.", record, 1) == ("{x} i am happy ->", " joy.", "joy")
    assert split_record("{label} or {label}", record, 1) == ("joy or", " joy", "joy")
    # A conversion or format spec is refused wherever a template is read (tests/security covers the API).
    with pytest.raises(InvalidRequest) as caught:
        split_record("{label!r} or {label}", record, 1)
    assert caught.value.param == "text_template"


def test_items_of_each_shape(tmp_path):
    fields = write_jsonl(tmp_path / "f.jsonl", [{"text": f"t{i}", "label": ["joy", "fear"][i % 2]} for i in range(10)])
    items = read_items(fields, EvaluationSettings(text_template="T: {text} => {label}", max_examples=4))
    assert [(i.prompt, i.reference, i.label) for i in items[:2]] == [
        ("T: t0 =>", "joy", "joy"),
        ("T: t1 =>", "fear", "fear"),
    ]
    assert len(items) == 4 and items[3].line == 4
    assert items[0].example.completion == " joy"
    chat = read_items(fields, EvaluationSettings(text_template="T: {text} => {label}", use_chat_template=True))
    assert chat[0].messages == [{"role": "user", "content": "T: t0 =>"}]

    conversations = write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello ", "weight": 1}]}],
    )
    [item] = read_items(conversations, EvaluationSettings())
    assert item.messages == [{"role": "user", "content": "hi"}] and item.reference == "hello"

    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    [item] = read_items(pc, EvaluationSettings())
    assert (item.prompt, item.reference) == ("2+2=", "4")

    # A DPO pair is scored as the conversation ending in its preferred reply.
    pair = {
        "input": {"messages": [{"role": "user", "content": "i am glad"}]},
        "preferred_output": [{"role": "assistant", "content": "joy"}],
        "non_preferred_output": [{"role": "assistant", "content": "fear"}],
    }
    [item] = read_items(write_jsonl(tmp_path / "d.jsonl", [pair]), EvaluationSettings())
    assert item.messages == [{"role": "user", "content": "i am glad"}] and item.reference == item.label == "joy"


def test_unscorable_data_is_refused_naming_the_line(tmp_path):
    ends_with_user = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]},
        ],
    )
    with pytest.raises(InvalidRequest) as caught:
        read_items(ends_with_user, EvaluationSettings())
    assert caught.value.param == "evaluation_file" and caught.value.message.startswith("line 2:")

    fields = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": "joy"}])
    with pytest.raises(InvalidRequest) as caught:
        read_items(fields, EvaluationSettings())
    assert caught.value.param == "text_template"


def test_accuracy_needs_a_label_task(tmp_path):
    emotions = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": c} for c in ["joy", "fear", "joy"]])
    settings = EvaluationSettings(metrics=["accuracy"])
    assert label_set(read_items(emotions, settings), settings) == ["joy", "fear"]

    free_text = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "completion": f"answer {i}"} for i in range(3)])
    with pytest.raises(InvalidRequest) as caught:
        label_set(read_items(free_text, settings), settings)
    assert caught.value.param == "metrics" and "label" in caught.value.message

    given = EvaluationSettings(metrics=["accuracy"], labels={"labels": ["joy", "sadness"]})
    with pytest.raises(InvalidRequest) as caught:
        label_set(read_items(emotions, given), given)
    assert caught.value.param == "labels.labels" and "line 2" in caught.value.message

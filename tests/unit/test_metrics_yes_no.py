"""POPE and MME metrics against worked examples and against the reference scripts behind published scores.

POPE, which lmms-eval reads differently from the published numbers, is checked against a transcription of LLaVA's
eval_pope.py; MME against lmms-eval's own parsing and aggregation, on hand-written and seeded random replies.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results, parse_pred_ans
from metrics_harness import TOKENS, first_mismatches, random_text

from convllava.metrics import MMERecord, mme_scores, parse_mme_answer, parse_pope_answer, pope_metrics

# --- POPE --------------------------------------------------------------------------------------------------------


def eval_pope_reading(text: str) -> str:
    """The reading of one reply in LLaVA's llava/eval/eval_pope.py, transcribed."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def eval_pope_metrics(texts: list[str], labels: list[str]) -> dict[str, float]:
    """eval_pope.py's counts and ratios, transcribed (labels: anything but "no" is positive)."""
    pred = [0 if eval_pope_reading(t) == "no" else 1 for t in texts]
    gold = [0 if label == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold, strict=True))
    tn = sum(p == 0 and g == 0 for p, g in zip(pred, gold, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold, strict=True))
    precision = float(tp) / float(tp + fp)
    recall = float(tp) / float(tp + fn)
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "yes_ratio": pred.count(1) / len(pred),
        **{"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("There is not a cat in the image.", "no"),
        ("Yes, there is a dog. No other animals are visible.", "yes"),  # only the first sentence counts
        ("no", "no"),
        (" no", "no"),
        ("no.", "no"),
        ("No,there", "yes"),  # the comma goes, leaving the word "Nothere"
        ("NO", "yes"),  # POPE's rule is case-sensitive
        ("Not at all", "yes"),
        ("There is\nno dog", "yes"),  # words are split at spaces only: "is\nno" is one word
        ("No\tdog", "yes"),
        ("nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_parsing_is_eval_popes(text, expected):
    assert parse_pope_answer(text) == expected
    assert eval_pope_reading(text) == expected


def test_pope_matches_eval_pope_on_generated_replies():
    rng = random.Random(4)
    words = "Yes yes No no not NO Not nope there is a dog cat in the image isn't".split()
    separators = (" ", " ", " ", " ", "  ", ", ", ",", ". ", ".", "\n", "\t", "\u00a0")
    texts = ["".join(rng.choice(words) + rng.choice(separators) for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    texts = [t.rstrip() if rng.random() < 0.5 else t for t in texts]
    labels = [rng.choice(("yes", "no")) for _ in texts]
    assert not first_mismatches([(t, parse_pope_answer(t), eval_pope_reading(t)) for t in texts])
    ours = pope_metrics(texts, labels)
    assert {k: ours[k] for k in eval_pope_metrics(texts, labels)} == eval_pope_metrics(texts, labels)
    assert 0.3 < ours["yes_ratio"] < 0.9
    # Replies that a split at any whitespace would read differently are among them.
    any_space = ["no" if {"No", "no", "not"} & set(t.split(".")[0].replace(",", "").split()) else "yes" for t in texts]
    assert sum(a != parse_pope_answer(t) for a, t in zip(any_space, texts, strict=True)) > 20


def test_pope_metrics_from_a_confusion_matrix():
    # TP = 4, FN = 1, FP = 2, TN = 3
    labels = ["yes"] * 5 + ["no"] * 5
    predictions = ["Yes."] * 4 + ["No, there is not."] + ["Yes, there is."] * 2 + ["No."] * 3
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (4, 1, 2, 3, 10)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert m["f1"] == pytest.approx(8 / 11)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert {k: m[k] for k in eval_pope_metrics(predictions, labels)} == eval_pope_metrics(predictions, labels)


def test_pope_metrics_edge_cases():
    empty = pope_metrics([], [])
    assert all(empty[k] == 0 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n"))
    all_no = pope_metrics(["No."] * 2, ["YES", "no"])  # labels in any case; no "yes" predicted: precision 0
    assert (all_no["accuracy"], all_no["precision"], all_no["recall"], all_no["f1"]) == (0.5, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="label 0"):
        pope_metrics(["yes"], ["maybe"])


# --- MME ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("Not sure", "no"),
        ("Maybe", "other"),
        ("It is yes", "other"),  # only the first 4 characters are looked at
        ("none", "no"),
        ("y", "yes"),  # single letters
        ("N", "no"),
        ("x", "other"),
        ("Y.", "yes"),  # periods are deleted first
        ("n.o", "no"),
        ("  yes\n", "yes"),
        ("NO!", "no"),
        ("unknown", "other"),
        ("", "other"),
    ],
)
def test_mme_parsing_is_lmms_evals(text, expected):
    assert parse_mme_answer(text) == expected
    assert parse_pred_ans(text) == expected


def test_mme_parsing_matches_lmms_eval_on_generated_replies():
    rng = random.Random(7)
    tokens = (*TOKENS, *"yes Yes no No NO not y n Y N yes. no. nope".split())
    texts = [random_text(rng, tokens, max_tokens=3) for _ in range(3000)]
    assert not first_mismatches([(t, parse_mme_answer(t), parse_pred_ans(t)) for t in texts])


def test_mme_acc_plus_and_scores():
    records = [
        MMERecord("existence", "1.jpg", "Yes", "Yes"),
        MMERecord("existence", "1.jpg", "No", "No"),
        MMERecord("existence", "2.jpg", "Yes", "Yes"),
        MMERecord("existence", "2.jpg", "Yes", "No"),  # wrong: image 2 loses acc+
        ("OCR", "3.jpg", "Not sure", "Yes"),  # "Not" reads as no: wrong
        ("OCR", "3.jpg", "No.", "No"),
        ("code_reasoning", "4.png", "yes", "Yes"),
        {"subtask": "code_reasoning", "image": "4.png", "prediction": "no", "answer": "No"},  # dicts work too
    ]
    scores = mme_scores(records)
    existence = scores["subtasks"]["existence"]
    assert (existence["accuracy"], existence["accuracy_plus"]) == (0.75, 0.5)
    assert existence["score"] == pytest.approx(125.0)
    assert (existence["questions"], existence["images"]) == (4, 2)
    assert scores["subtasks"]["OCR"]["score"] == pytest.approx(50.0)  # acc 0.5, acc+ 0
    assert scores["subtasks"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert scores["perception"] == pytest.approx(175.0)
    assert scores["cognition"] == pytest.approx(200.0)
    assert scores["total"] == pytest.approx(375.0)
    assert mme_scores([]) == {"subtasks": {}, "perception": 0.0, "cognition": 0.0, "total": 0.0}
    with pytest.raises(ValueError, match="label 0"):
        mme_scores([("color", "x", "yes", "perhaps")])


def test_mme_scores_match_lmms_eval_aggregation():
    rng = random.Random(8)
    subtasks = ["existence", "count", "OCR", "artwork", "code_reasoning", "text_translation"]
    replies = ("Yes", "No", "yes.", "no", "Not sure", "y", "N", "Maybe", "There is no dog", "Yes, there is.")
    records, by_key = [], defaultdict(list)
    for i in range(600):  # 2 questions per image, as MME has
        subtask = rng.choice(subtasks)
        for answer in ("Yes", "No"):
            record = MMERecord(subtask, f"{subtask}/{i}.jpg", rng.choice(replies), answer)
            records.append(record)
            doc = {"question_id": record.image, "category": subtask, "answer": answer}
            for key, value in mme_process_results(doc, [record.prediction]).items():
                by_key[key].append(value)
    ours = mme_scores(records)
    assert ours["perception"] == pytest.approx(mme_aggregate_results(by_key["mme_perception_score"]), rel=1e-12)
    assert ours["cognition"] == pytest.approx(mme_aggregate_results(by_key["mme_cognition_score"]), rel=1e-12)
    assert 0 < ours["cognition"] < 400 and 0 < ours["perception"] < 800

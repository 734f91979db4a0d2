"""Yes/no benchmarks: POPE (object hallucination) and MME (paired questions per image).

Each reads free text as the script behind its published scores does: POPE as LLaVA's `llava/eval/eval_pope.py`, MME
as lmms-eval's `mme` task (`lmms_eval.tasks.mme.utils.parse_pred_ans`, which ConvLLaVA's `scripts/eval-lmms.sh`
runs). tests/unit/test_metrics_yes_no.py checks both against those references.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from convllava.metrics.text import _check_lengths

MME_PERCEPTION = tuple("existence count position color posters celebrity scene landmark artwork ocr".split())
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_pope_answer(text: str) -> str:
    """ "yes" or "no" as LLaVA's eval_pope.py (its copy of POPE's evaluate.py) reads free text.

    Keep the text before the first ".", drop commas, split at single spaces only (a tab or newline does not end a
    word, so "is<newline>no" is one word): "No", "no" or "not" among the words means "no", anything else (empty text
    included) "yes". Case-sensitive like the original, so "NO" reads yes.
    """
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"}.intersection(words) else "yes"


def _yes(label: str, index: int) -> bool:
    value = label.strip().lower()
    if value not in ("yes", "no"):
        raise ValueError(f"label {index} must be 'yes' or 'no', got {label!r}")
    return value == "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class.

    Args:
        predictions: the model's free-text answers, read by `parse_pope_answer`.
        labels: "yes" / "no" per question (any case).

    Returns:
        accuracy, precision, recall, f1, yes_ratio (share of "yes" predictions) and the counts tp, fp, tn, fn, n.
        Ratios with an empty denominator are 0.0 (eval_pope.py divides by zero there).

    Raises:
        ValueError: lengths differ or a label is not yes/no.
    """
    _check_lengths(predictions, labels)
    pred = [parse_pope_answer(p) == "yes" for p in predictions]
    gold = [_yes(label, i) for i, label in enumerate(labels)]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(not p and g for p, g in zip(pred, gold, strict=True))
    n = len(pred)
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        **{"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n},
    }


def parse_mme_answer(text: str) -> str:
    """ "yes", "no" or "other" as lmms-eval's MME task reads free text (`parse_pred_ans`, from Otter's eval).

    Lowercase, strip, delete every "."; the result if it is "yes" or "no"; a lone "y" / "n" is yes / no (any other
    single character: other); else "yes" if the first 4 characters contain "yes", else "no" if they contain "no"
    ("Not sure" → no), else other. MME's own eval_tool/calculation.py reads the same minus the period deletion and
    the y / n letters.
    """
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


class MMERecord(NamedTuple):
    """One MME question: `subtask` is the MME folder name ("existence", "OCR", "code_reasoning", ...), `image`
    any key naming its image (its 2 questions share it), `answer` the ground truth "Yes" / "No"."""

    subtask: str
    image: str
    prediction: str
    answer: str


def _mme_record(record: MMERecord | tuple[str, str, str, str] | Mapping[str, str]) -> MMERecord:
    if isinstance(record, Mapping):
        return MMERecord(*(record[field] for field in MMERecord._fields))
    return MMERecord(*record)


def mme_scores(records: Iterable[MMERecord | tuple[str, str, str, str] | Mapping[str, str]]) -> dict:
    """MME scores as MME's eval_tool/calculation.py sums them (lmms-eval's `mme_aggregate_results` agrees with it
    when every image has its 2 questions): per subtask, accuracy = correct questions / questions, accuracy_plus =
    images whose questions are all correct / images, score = accuracy × 100 + accuracy_plus × 100 (at most 200).
    Answers are read by `parse_mme_answer`.

    Args:
        records: one per question, as `MMERecord`s, 4-tuples in its field order or dicts with its field names.

    Returns:
        {"subtasks": {name: {"accuracy", "accuracy_plus", "score", "questions", "images"}},
         "perception": sum of the perception subtasks' scores (the paper's "MME", at most 2000),
         "cognition": sum of the cognition subtasks' scores (at most 800), "total": sum of all subtasks' scores}.
        Subtask names match MME_PERCEPTION / MME_COGNITION case-insensitively; others count in "total" only.

    Raises:
        ValueError: an answer is not yes/no.
    """
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for i, (subtask, image, prediction, answer) in enumerate(map(_mme_record, records)):
        correct = parse_mme_answer(prediction) == ("yes" if _yes(answer, i) else "no")
        images[subtask][image].append(correct)
    subtasks = {}
    for subtask, per_image in images.items():
        marks = [c for cs in per_image.values() for c in cs]
        accuracy = sum(marks) / len(marks)
        accuracy_plus = sum(all(cs) for cs in per_image.values()) / len(per_image)
        subtasks[subtask] = {
            "accuracy": accuracy,
            "accuracy_plus": accuracy_plus,
            "score": accuracy * 100 + accuracy_plus * 100,  # calculation.py's order of operations
            "questions": len(marks),
            "images": len(per_image),
        }

    def total(names: Sequence[str] | None) -> float:
        return sum(s["score"] for k, s in subtasks.items() if names is None or k.lower() in names)

    return {
        "subtasks": subtasks,
        "perception": total(MME_PERCEPTION),
        "cognition": total(MME_COGNITION),
        "total": total(None),
    }

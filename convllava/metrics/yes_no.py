"""Yes/no benchmarks: POPE (object hallucination) and MME (paired questions per image)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from convllava.metrics.text import _check_lengths

MME_PERCEPTION = tuple("existence count position color posters celebrity scene landmark artwork ocr".split())
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_pope_answer(text: str) -> str:
    """ "yes" or "no" as POPE's evaluate.py (and LLaVA's eval_pope.py) read free text.

    Keep the first sentence (up to the first "."), drop commas, split into words: "No", "no" or "not" among them
    means "no", anything else (empty text included) "yes". Case-sensitive like the original, so "NO" reads yes.
    """
    words = set(text.split(".")[0].replace(",", "").split())
    return "no" if words & {"No", "no", "not"} else "yes"


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
        Ratios with an empty denominator are 0.0.

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
    """ "yes", "no" or "other" as MME's calculation.py reads free text: the whole lowercased answer if it is yes/no,
    else "yes" if the first 4 characters contain "yes", else "no" if they contain "no" ("Not sure" → "no")."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
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
    """MME scores: per subtask, accuracy = correct questions / questions, accuracy_plus = images whose questions
    are all correct / images, score = (accuracy + accuracy_plus) × 100 (at most 200).

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
            "score": (accuracy + accuracy_plus) * 100,
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

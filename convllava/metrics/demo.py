"""Scores on the demo data's held-out sets (pipelines/demo/data.py: eval/{open,pope,grounding,detail}.jsonl)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

from convllava.metrics.grounding import _valid, box_to_original, iou, parse_box
from convllava.metrics.text import NUMBER_WORDS

EXACT_TYPES = ("color", "shape", "count", "pope", "detail")
DEMO_TYPES = (*EXACT_TYPES, "grounding")
_NON_WORD = re.compile(r"[^\w\s]")


def normalize_short_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed, number words → digits: " Three." → "3"."""
    words = _NON_WORD.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def _grounding_hit(prediction: str, record: Mapping) -> bool:
    box = parse_box(prediction)
    if not _valid(box):
        return False
    # Demo answers are normalised to the original image (no padding), so frame="original".
    mapped = box_to_original(box, record["width"], record["height"], frame="original")  # type: ignore[arg-type]
    return iou(mapped, record["bbox_pixels"]) >= 0.5


def demo_accuracy(
    records: Iterable[Mapping],
    predictions: Mapping[str, str],
    chance: Mapping[str, float | None] | None = None,
) -> dict:
    """Accuracy per question type on the demo eval sets, next to the chance level of each.

    Args:
        records: the eval JSONL records as dicts: "id", "type" (color, shape, count, pope, detail, grounding),
            "answer" (a short string; for grounding the normalised box, unused here), and for grounding also
            "bbox_pixels" ([x1, y1, x2, y2] in pixels), "width", "height".
        predictions: record id → the model's reply text; a record without a reply counts as wrong.
        chance: metadata.json's "chance" (type → accuracy of uniform guessing); missing types get None.

    Returns:
        {"per_type": {type: {"accuracy", "n", "chance"}} for each type with records, "overall": the mean of the
        per-type accuracies (each type weighs the same; None without records), "overall_chance": the mean of the
        per-type chances (None when a type's chance is unknown), "n": all records}.
        color/shape/count/pope/detail score exact match after `normalize_short_answer` on both sides;
        grounding scores IoU ≥ 0.5 of the parsed box (frame="original") with `bbox_pixels`.

    Raises:
        ValueError: a record has a type not in DEMO_TYPES (the message names the record id).
    """
    marks: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        kind, reply = record["type"], predictions.get(record["id"])
        if kind not in DEMO_TYPES:
            raise ValueError(f"record {record['id']!r} has type {kind!r}; expected one of {', '.join(DEMO_TYPES)}")
        if reply is None:
            marks[kind].append(False)
        elif kind == "grounding":
            marks[kind].append(_grounding_hit(reply, record))
        else:
            marks[kind].append(normalize_short_answer(reply) == normalize_short_answer(str(record["answer"])))
    chance = chance or {}
    per_type = {
        kind: {"accuracy": sum(marks[kind]) / len(marks[kind]), "n": len(marks[kind]), "chance": chance.get(kind)}
        for kind in DEMO_TYPES
        if marks[kind]
    }
    accuracies = [v["accuracy"] for v in per_type.values()]
    chances = [v["chance"] for v in per_type.values()]
    return {
        "per_type": per_type,
        "overall": sum(accuracies) / len(accuracies) if accuracies else None,
        # what uniform guessing scores on `overall`: the mean of the per-type chances (None if one is unknown)
        "overall_chance": sum(chances) / len(chances) if chances and None not in chances else None,
        "n": sum(v["n"] for v in per_type.values()),
    }

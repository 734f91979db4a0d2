"""Per-type accuracy on the demo data's held-out sets, next to their chance levels."""

from __future__ import annotations

import json

import pytest

from convllava.metrics import demo_accuracy, normalize_short_answer


def test_normalize_short_answer():
    assert normalize_short_answer(" Three.") == "3"
    assert normalize_short_answer("Yes!") == "yes"
    assert normalize_short_answer("Light-Blue") == "light blue"
    assert normalize_short_answer("47") == "47"


def test_demo_accuracy_per_type_with_chance():
    box = {"width": 200, "height": 100, "bbox_pixels": [0, 80, 100, 90], "answer": [0.0, 0.8, 0.5, 0.9]}
    records = [
        {"id": "open-0", "type": "color", "answer": "red"},
        {"id": "open-1", "type": "shape", "answer": "circle"},
        {"id": "open-2", "type": "count", "answer": "3"},
        {"id": "pope-0", "type": "pope", "answer": "yes"},
        {"id": "pope-1", "type": "pope", "answer": "no"},
        {"id": "detail-0", "type": "detail", "answer": "47"},
        {"id": "grounding-0", "type": "grounding", **box},
    ]
    predictions = {
        "open-0": "Red.",
        "open-1": "Square",
        "open-2": "three",
        "pope-0": "Yes",  # pope-1 has no reply: wrong
        "detail-0": " 47 ",
        # In the original frame this is the target; read in the square frame it would fall into the padding.
        "grounding-0": "[0.00, 0.80, 0.50, 0.90]",
    }
    chance = {"color": 1 / 6, "shape": 1 / 3, "count": 0.25, "pope": 0.5, "detail": 1 / 90}
    result = demo_accuracy(records, predictions, chance)
    accuracy = {k: v["accuracy"] for k, v in result["per_type"].items()}
    assert accuracy == {"color": 1.0, "shape": 0.0, "count": 1.0, "pope": 0.5, "detail": 1.0, "grounding": 1.0}
    assert result["per_type"]["pope"] == {"accuracy": 0.5, "n": 2, "chance": 0.5}
    assert result["per_type"]["grounding"]["chance"] is None  # not in the chance mapping
    assert result["overall"] == pytest.approx(4.5 / 6)
    assert result["overall_chance"] is None  # grounding's chance is unknown, so the mean's is too
    assert result["n"] == 7
    assert demo_accuracy([], {}) == {"per_type": {}, "overall": None, "overall_chance": None, "n": 0}
    with pytest.raises(ValueError, match="'x-1'"):
        demo_accuracy([{"id": "x-1", "type": "caption", "answer": ""}], {})


def test_demo_accuracy_reads_the_generated_eval_files(tmp_path):
    from pipelines.demo.data import generate_demo_data

    generate_demo_data(tmp_path, seed=3, n_caption=0, n_instruct=0, n_eval=6, with_photos=False)
    records = [json.loads(line) for f in sorted((tmp_path / "eval").glob("*.jsonl")) for line in f.open()]
    chance = json.loads((tmp_path / "metadata.json").read_text())["chance"]
    # Replies in the training form: short answers as they are, grounding as "[x1, y1, x2, y2]" with 2 decimals.
    replies = {
        r["id"]: ("[" + ", ".join(f"{v:.2f}" for v in r["answer"]) + "]" if r["type"] == "grounding" else r["answer"])
        for r in records
    }
    result = demo_accuracy(records, replies, chance)
    assert set(result["per_type"]) == {"color", "shape", "count", "pope", "detail", "grounding"}
    assert all(v["accuracy"] == 1.0 for v in result["per_type"].values())
    assert result["per_type"]["pope"]["chance"] == 0.5 and result["per_type"]["grounding"]["n"] == 6
    assert result["overall"] == 1.0 and result["n"] == 24
    expected_chance = sum(chance[t] for t in result["per_type"]) / 6  # each type weighs the same, as in overall
    assert result["overall_chance"] == pytest.approx(expected_chance) and 0.2 < expected_chance < 0.25
    wrong = demo_accuracy(records, {r["id"]: "[0.9, 0.9, 1.0, 1.0]" for r in records}, chance)
    assert wrong["overall"] < 0.5

"""Hostile evaluation input: NaN/inf boxes in grounding annotations or model output are misses, never crashes."""

from __future__ import annotations

import json
import math

from PIL import Image

from jobs.evaluate.benchmarks import Benchmark


def test_nan_and_inf_boxes_score_as_misses(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    rows = [
        {"id": 1, "image": "a.jpg", "expression": "left", "bbox": [0, 0, 100, 100], "width": 200, "height": 100},
        {"id": 2, "image": "a.jpg", "expression": "nan", "bbox": [math.nan, 0, 10, 10], "width": 200, "height": 100},
        {"id": 3, "image": "a.jpg", "expression": "inf", "bbox": [0, 0, math.inf, 10], "width": 200, "height": 100},
        {"id": 4, "image": "a.jpg", "expression": "ok", "bbox": [0, 0, 100, 100], "width": 200, "height": 100},
    ]
    (tmp_path / "refcoco.json").write_text(json.dumps(rows))  # json writes NaN / Infinity, as broken dumps do
    bench = Benchmark("refcoco", "refcoco", tmp_path, options={"frame": "original"})
    items = bench.items()
    answers = {
        "1": "[0.0, 0.0, 0.5, 1.0]",
        "2": "[0.0, 0.0, 0.05, 0.1]",
        "3": "[0, 0, 1, 0.1]",
        "4": "[nan, 0, inf, 1]",
    }
    scores = bench.score(items, answers)
    assert scores == {"precision@0.5": 0.25}  # only sample 1 is a hit; NaN/inf on either side is a miss

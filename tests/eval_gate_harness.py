"""Helpers shared by the unit and integration tests of eval_gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

# TextVQA: how many of the 10 annotators gave the first answer (the rest say "other"): k = 10, 2, 1 score
# 1.0, 0.6 and 0.3 when that answer is predicted.
AGREEING = (10, 2, 1)
POPE_SIZES = {"adversarial": 4, "popular": 3, "random": 2}


def _save(photo, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(photo.path).convert("RGB").save(path)  # format from the suffix: real JPEG / PNG files


def _mme_pair(thing: str) -> str:  # MME: two questions per image, one Yes and one No
    return (
        f"Is there a {thing} in this image? Please answer yes or no.\tYes\n"
        f"Is there a dinosaur in this image? Please answer yes or no.\tNo\n"
    )


def score_answers(benches, answer) -> dict[str, float]:
    """Flat `benchmark/metric` results, as run_eval names them, for the answers `answer(benchmark, item)` gives."""
    results = {}
    for b in benches:
        items = b.items()
        for key, value in b.score(items, {it.id: answer(b, it) for it in items}).items():
            results[f"{b.name}/{key}"] = float(value)
    return results


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory):
    from convllava.data.sample_images import sample_photos

    root, photos = tmp_path_factory.mktemp("benchmarks"), sample_photos()
    rows = []
    for i, (photo, k) in enumerate(zip(photos, AGREEING, strict=False)):
        image_id = f"{i:04d}c91397f2fe05"
        _save(photo, root / "textvqa" / "train_images" / f"{image_id}.jpg")
        rows.append(
            {
                "question_id": 34602 + i,
                "question": "what is shown?",
                "image_id": image_id,
                "image_classes": ["Poster"],
                "image_width": 512,
                "image_height": 512,
                "set_name": "val",
                "answers": [photo.subject] * k + ["other"] * (10 - k),
            }
        )
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": rows})
    )
    docs = []
    for i, photo in enumerate(p for p in photos if p.name in ("page", "camera")):
        _save(photo, root / "docvqa" / "val" / "documents" / f"ptdg022{i}_8.png")
        docs.append(
            {
                "questionId": 49153 + i,
                "question": "What is the title?",
                "question_types": ["layout"],
                "image": f"documents/ptdg022{i}_8.png",
                "docId": 14465 + i,
                "answers": [photo.caption, "x"],
                "data_split": "val",
            }
        )
    (root / "docvqa" / "val" / "val_v1.0.json").write_text(
        json.dumps({"dataset_name": "docvqa", "dataset_split": "val", "dataset_version": "1.0", "data": docs})
    )
    coco = [f"COCO_val2014_00000031019{i}.jpg" for i in range(2)]
    for name, photo in zip(coco, photos[3:5], strict=True):
        _save(photo, root / "pope" / "val2014" / name)
    for split, n in POPE_SIZES.items():
        lines = [
            json.dumps(
                {
                    "question_id": q + 1,
                    "image": coco[q % 2],
                    "text": f"Is there a {photos[3 + q % 2].subject} in the image?",
                    "label": "yes" if q % 2 == 0 else "no",
                }
            )
            for q in range(n)
        ]
        (root / "pope" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    for n, photo in enumerate(photos[:2]):  # perception, side by side: NAME.jpg + NAME.txt
        _save(photo, root / "mme" / "existence" / f"00000000604{n}.jpg")
        (root / "mme" / "existence" / f"00000000604{n}.txt").write_text(_mme_pair(photo.subject))
    _save(photos[2], root / "mme" / "artwork" / "images" / "10002.jpg")  # perception, images/ + questions_answers_YN/
    (root / "mme" / "artwork" / "questions_answers_YN").mkdir()
    (root / "mme" / "artwork" / "questions_answers_YN" / "10002.txt").write_text(_mme_pair(photos[2].subject))
    _save(photos[7], root / "mme" / "code_reasoning" / "0020.png")  # cognition, side by side
    (root / "mme" / "code_reasoning" / "0020.txt").write_text(_mme_pair("page"))
    return root

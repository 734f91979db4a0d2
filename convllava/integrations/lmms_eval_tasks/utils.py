"""Prompt, image and scoring functions of the convllava lmms-eval tasks (referenced by `!function utils.*`).

lmms-eval loads this file by path, so it imports only absolute names.
"""

from __future__ import annotations

from PIL import Image

from convllava.integrations import as_image
from convllava.metrics.demo import normalize_short_answer


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The record's image (a path; relative paths are relative to the current directory), or none."""
    return [as_image(doc["image"])] if doc.get("image") else []


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match after `normalize_short_answer` on both sides (case, punctuation, number words → digits)."""
    hit = normalize_short_answer(results[0]) == normalize_short_answer(str(doc["answer"]))
    return {"exact_match": float(hit)}

"""Referring-expression grounding (RefCOCO / RefCOCO+ / RefCOCOg): box parsing, frames, IoU, Precision@0.5.

Box convention of LLaVA-1.5 and ConvLLaVA: the model answers `[x1, y1, x2, y2]` normalised to [0, 1] — or to
[0, 1000] when the four numbers sum to 4 or more (then divided by 1000) — in the frame of the image the model
saw. In the paper's `square` mode that image is the original padded to a square (LLaVA's expand2square: side
S = max(w, h), the original centred), so a box maps back with x = x·S - (S - w)/2, y = y·S - (S - h)/2 and is
clipped to the image. In our `bucket` and `short-side` modes the model sees the whole original image without
padding and its boxes are relative to it (frame="original": x = x·w, y = y·h); the demo data's answers are too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

from convllava.metrics.text import _check_lengths

GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {}."
Frame = Literal["square", "original"]

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
_FOUR_NUMBERS = re.compile(rf"({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})")


def parse_box(text: str) -> list[float] | None:
    """The first box in a reply: the first 4 numbers of the first [...] holding at least 4, else the first plain
    "x1, y1, x2, y2" run; None when there is neither. "[0.1, 0.2, 0.5, 0.6]" → [0.1, 0.2, 0.5, 0.6]."""
    for inside in _BRACKETED.findall(text):
        numbers = re.findall(_NUMBER, inside)
        if len(numbers) >= 4:
            return [float(v) for v in numbers[:4]]
    match = _FOUR_NUMBERS.search(text)
    return [float(v) for v in match.groups()] if match else None


def _valid(box: Sequence[float] | None) -> bool:
    """Four finite numbers with x2 > x1 and y2 > y1."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x1, y1, x2, y2)) and x2 > x1 and y2 > y1


def box_to_original(box: Sequence[float], width: float, height: float, frame: Frame = "square") -> list[float]:
    """A model box (see the module docstring) in pixels of the original width × height image, clipped to it.

    E.g. a 200×100 image, frame="square" (S = 200): [0.25, 0.25, 0.75, 0.75] → [50, 0, 150, 100];
    "[250, 250, 750, 750]" (sum ≥ 4, so per mille) is the same box.

    Raises:
        ValueError: `box` is not 4 numbers or `frame` is unknown.
    """
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {len(box)} numbers: {list(box)}")
    values = [float(v) for v in box]
    if sum(values) >= 4:  # NaN sums compare False and stay as they are
        values = [v / 1000 for v in values]
    if frame == "square":
        side = max(width, height)
        x_scale, y_scale, x_shift, y_shift = side, side, (side - width) / 2, (side - height) / 2
    elif frame == "original":
        x_scale, y_scale, x_shift, y_shift = width, height, 0.0, 0.0
    else:
        raise ValueError(f"frame must be 'square' or 'original', got {frame!r}")
    x1, y1, x2, y2 = values
    xs = [min(max(v * x_scale - x_shift, 0.0), width) for v in (x1, x2)]
    ys = [min(max(v * y_scale - y_shift, 0.0), height) for v in (y1, y2)]
    return [xs[0], ys[0], xs[1], ys[1]]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes in one frame (continuous coordinates);
    0.0 when either box is not four finite numbers with x2 > x1 and y2 > y1."""
    if not (_valid(a) and _valid(b)):
        return 0.0
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union


def grounding_precision(
    predictions: Sequence[str | Sequence[float] | None],
    gt_boxes: Sequence[Sequence[float]],
    sizes: Sequence[tuple[float, float]],
    threshold: float = 0.5,
    frame: Frame = "square",
) -> float:
    """Precision@IoU: the share of referring expressions whose predicted box reaches IoU ≥ threshold.

    Args:
        predictions: the model's replies (parsed with `parse_box`) or boxes already parsed; None, unparsable text,
            NaN/inf, x2 < x1 or y2 < y1 count as misses, never as errors.
        gt_boxes: [x1, y1, x2, y2] in pixels of the original image (COCO's [x, y, w, h] → [x, y, x + w, y + h]).
        sizes: (width, height) of each original image.
        threshold: 0.5 for RefCOCO/+/g.
        frame: "square" for padded-square inputs (the paper), "original" for unpadded ones (our bucket mode).

    Returns:
        The precision in [0, 1]; 0.0 for no predictions.

    Raises:
        ValueError: the three sequences differ in length or `frame` is unknown.
    """
    _check_lengths(predictions, gt_boxes)
    _check_lengths(predictions, sizes)
    if frame not in ("square", "original"):
        raise ValueError(f"frame must be 'square' or 'original', got {frame!r}")
    hits = 0
    for prediction, gt, (width, height) in zip(predictions, gt_boxes, sizes, strict=True):
        box = parse_box(prediction) if isinstance(prediction, str) else prediction
        if _valid(box):
            hits += iou(box_to_original(box, width, height, frame), gt) >= threshold  # type: ignore[arg-type]
    return hits / len(predictions) if predictions else 0.0

"""Grounding metrics: LLaVA-1.5's prompt and box convention (padded-square or original frame), IoU and
Precision@0.5 with malformed boxes counted as misses."""

from __future__ import annotations

import math

import pytest

from convllava.metrics import GROUNDING_PROMPT, box_to_original, grounding_precision, iou, parse_box


def test_grounding_prompt_is_llava_15s():
    assert GROUNDING_PROMPT.format("the red circle") == (
        "Please provide the bounding box coordinate of the region this sentence describes: the red circle."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[0.1, 0.2, 0.5, 0.6]", [0.1, 0.2, 0.5, 0.6]),
        ("The box is [250, 250, 750, 750].", [250.0, 250.0, 750.0, 750.0]),
        ("0.1, 0.2, 0.3, 0.4", [0.1, 0.2, 0.3, 0.4]),
        ("[1, 2] and then [0.1,0.2,0.3,0.4,0.9]", [0.1, 0.2, 0.3, 0.4]),  # first bracket holding 4 numbers
        ("[0.1, 0.2, 0.3]", None),
        ("no box here", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


def test_box_to_original_square_frame_undoes_centred_padding():
    # 200×100 image padded to S = 200: 50 px of padding above and below.
    assert box_to_original([0.25, 0.25, 0.75, 0.75], 200, 100) == [50.0, 0.0, 150.0, 100.0]
    assert box_to_original([250, 250, 750, 750], 200, 100) == [50.0, 0.0, 150.0, 100.0]  # sum ≥ 4: per mille
    # 100×200 image: the box reaches into the side padding and is clipped to the image.
    assert box_to_original([0.0, 0.0, 1.0, 1.0], 100, 200) == [0.0, 0.0, 100.0, 200.0]
    assert box_to_original([0.1, 0.0, 0.2, 0.2], 200, 100) == [20.0, 0.0, 40.0, 0.0]  # all in the padding


def test_box_to_original_original_frame_scales_by_width_and_height():
    assert box_to_original([0.25, 0.25, 0.75, 0.75], 200, 100, frame="original") == [50.0, 25.0, 150.0, 75.0]
    assert box_to_original([250, 250, 750, 750], 200, 100, frame="original") == [50.0, 25.0, 150.0, 75.0]
    with pytest.raises(ValueError, match="frame"):
        box_to_original([0, 0, 1, 1], 10, 10, frame="padded")
    with pytest.raises(ValueError, match="3 numbers"):
        box_to_original([0, 0, 1], 10, 10)


def test_iou():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)  # half of each overlaps: 2 / (4 + 4 - 2)
    assert iou([0, 0, 2, 2], [0, 0, 1, 2]) == 0.5  # one holds the other, half its area
    assert iou([2, 0, 0, 2], [0, 0, 2, 2]) == 0.0  # x2 < x1
    assert iou([math.nan, 0, 1, 1], [0, 0, 1, 1]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_grounding_precision_counts_malformed_boxes_as_misses():
    predictions = [
        "[250, 250, 750, 750]",  # per mille → [50, 0, 150, 100]: hit
        [math.nan, 0.0, 1.0, 1.0],
        [0.0, math.inf, 1.0, 1.0],
        "I cannot see it",
        [0.6, 0.5, 0.4, 0.9],  # x2 < x1
        None,
        [0.1, 0.2],
        "[0.25, 0.25, 0.75, 0.75]",  # hit
    ]
    gts, sizes = [[50, 0, 150, 100]] * 8, [(200, 100)] * 8
    assert grounding_precision(predictions, gts, sizes) == pytest.approx(2 / 8)
    # In the original frame the same box is [50, 25, 150, 75]: IoU exactly 0.5 still counts (≥ threshold).
    assert grounding_precision(["[0.25, 0.25, 0.75, 0.75]"], gts[:1], sizes[:1], frame="original") == 1.0
    assert grounding_precision(["[0.25, 0.25, 0.75, 0.75]"], gts[:1], sizes[:1], 0.51, frame="original") == 0.0
    assert grounding_precision([], [], []) == 0.0
    with pytest.raises(ValueError, match="frame"):
        grounding_precision([], [], [], frame="padded")

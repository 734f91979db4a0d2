"""Resolution buckets: (H, W) pairs, both multiples of the tower's stride, under a visual-token budget.

ConvNeXt is fully convolutional, so any H×W that is a multiple of its total stride (64) works.
A bucket set for resolution R spends at most (R/64)² visual tokens per image — the paper's budget
at R×R — but spreads them over aspect ratios from 1:4 to 4:1, so a wide image is not squashed or
padded to a square. Each image goes to the bucket nearest its aspect ratio (in log space), is
resized to fit inside it and the small remainder is padded, centred.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

STRIDE = 64
MAX_ASPECT = 4.0
# How an image meets the token budget: resized to R×R (the paper's), into its aspect-ratio bucket, or short side to R.
Mode = Literal["square", "bucket", "short-side"]
MODES: tuple[str, ...] = get_args(Mode)


def check_size(height: int, width: int, stride: int = STRIDE) -> None:
    """Raise a ValueError unless both sides are positive multiples of `stride`."""
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ValueError(
            f"image size {height}x{width} (HxW) is not a multiple of the vision tower's stride {stride}; "
            f"resize or pad to e.g. {max(stride, round(height / stride) * stride)}x"
            f"{max(stride, round(width / stride) * stride)}"
        )


def num_visual_tokens(height: int, width: int, stride: int = STRIDE) -> int:
    """Visual tokens the tower emits for an H×W input: (H/64)·(W/64)."""
    check_size(height, width, stride)
    return (height // stride) * (width // stride)


def check_resolution(resolution: int, stride: int = STRIDE) -> None:
    if resolution <= 0 or resolution % stride:
        raise ValueError(f"resolution must be a positive multiple of {stride}, got {resolution}")


@dataclass(frozen=True, order=True)
class Bucket:
    """One (height, width) bucket in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    def tokens(self, stride: int = STRIDE) -> int:
        return num_visual_tokens(self.height, self.width, stride)

    @classmethod
    def parse(cls, name: str) -> Bucket:
        h, _, w = name.partition("x")
        return cls(int(h), int(w))


def make_buckets(resolution: int, stride: int = STRIDE, max_aspect: float = MAX_ASPECT) -> list[Bucket]:
    """All buckets whose token count fits the budget (resolution/stride)² and whose aspect lies in
    [1/max_aspect, max_aspect]. For each height (in tokens) the widest width under the budget is
    taken, so every bucket spends nearly the whole budget.

    >>> [b.name for b in make_buckets(256)]
    ['128x512', '192x320', '256x256', '320x192', '384x128', '448x128', '512x128']
    """
    check_resolution(resolution, stride)
    budget = (resolution // stride) ** 2
    buckets = []
    for h in range(1, budget + 1):
        w = budget // h
        if w < 1:
            break
        if 1 / max_aspect <= w / h <= max_aspect:
            buckets.append(Bucket(h * stride, w * stride))
    return sorted(set(buckets))


def nearest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, in log space (ties → the larger area)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (WxH)")
    log_ar = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - log_ar), -b.height * b.width))


@dataclass(frozen=True)
class Placement:
    """Where a resized image sits inside its canvas: content size and top-left offset, in pixels.

    Used to map boxes between the original image and the model's input frame.
    """

    canvas_height: int
    canvas_width: int
    content_height: int
    content_width: int
    offset_y: int
    offset_x: int

    @property
    def padded_fraction(self) -> float:
        return 1.0 - (self.content_height * self.content_width) / (self.canvas_height * self.canvas_width)


def fit_in_canvas(width: int, height: int, canvas_height: int, canvas_width: int) -> Placement:
    """Resize (up or down) keeping the aspect ratio so the image fits the canvas, centred."""
    scale = min(canvas_height / height, canvas_width / width)
    ch = min(canvas_height, max(1, round(height * scale)))
    cw = min(canvas_width, max(1, round(width * scale)))
    return Placement(canvas_height, canvas_width, ch, cw, (canvas_height - ch) // 2, (canvas_width - cw) // 2)

"""The demo's scenes: seeded random layouts of flat shapes on light canvases, and their rendering.

A scene holds 1–MAX_SHAPES non-overlapping shapes (circle/square/triangle in six well-separated colours) on a canvas
of varied size and aspect ratio (sides 192..768 px, aspect 1:3..3:1); detail scenes also carry a small number.
`pipelines.demo.data` turns scenes into captions, questions and the eval sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (130, 40, 170),
    "orange": (250, 120, 0),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((250, 250, 250), (232, 232, 232), (245, 240, 222), (228, 238, 248))
# Few, large shapes: at the demo's 256-px budget a shape then covers about one to two of the 4×4 visual tokens,
# which a tiny tower trained from scratch learns to read in the demo's minutes (1–4 shapes of 20–34% did not).
MAX_SHAPES = 3
SHAPE_SIZE = (0.28, 0.42)  # side of a shape's square box, as a share of the canvas's short side
TEXT_COLOR = (35, 35, 35)
PNG_FRACTION = 0.1


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    index: int
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    number: str | None = None
    number_box: tuple[int, int, int, int] | None = None  # pixels, like Shape.box
    number_size: int = 0  # font size in pixels
    fmt: str = "jpg"

    @property
    def image(self) -> str:
        return f"images/scene_{self.index:06d}.{self.fmt}"

    def unique(self, attr: str) -> list[str]:
        """Values of `attr` ("kind", "color" or "name") held by exactly one shape, in drawing order."""
        values = [getattr(s, attr) for s in self.shapes]
        return [v for v in values if values.count(v) == 1]

    def shape(self, name: str) -> Shape:
        return next(s for s in self.shapes if s.name == name)

    def where(self, shape: Shape) -> str:
        """Position bucket of a shape's centre in thirds: "at the top left", "on the right", "in the center"."""
        cx, cy = (shape.box[0] + shape.box[2]) / 2 / self.width, (shape.box[1] + shape.box[3]) / 2 / self.height
        col = ("left", "center", "right")[min(2, int(cx * 3))]
        row = ("top", "middle", "bottom")[min(2, int(cy * 3))]
        if row == "middle":
            return "in the center" if col == "center" else f"on the {col}"
        return f"at the {row}" if col == "center" else f"at the {row} {col}"

    def normalized_box(self, shape: Shape, digits: int) -> list[float]:
        """[x1, y1, x2, y2] / [width, height, width, height], rounded to `digits`."""
        sizes = (self.width, self.height, self.width, self.height)
        return [round(v / size, digits) for v, size in zip(shape.box, sizes, strict=True)]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow ≥ 10.1 bundles a scalable font


def _overlaps(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place_shapes(rng: np.random.Generator, width: int, height: int, gap: int) -> list[Shape] | None:
    """1–MAX_SHAPES square-boxed shapes, each SHAPE_SIZE of the short side, `gap` apart; None when they do not fit."""
    short, shapes = min(width, height), []
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        for _attempt in range(50):
            side = int(short * rng.uniform(*SHAPE_SIZE))
            x, y = int(rng.integers(gap, width - side - gap)), int(rng.integers(gap, height - side - gap))
            box = (x, y, x + side, y + side)
            if not any(_overlaps(box, s.box, gap) for s in shapes):
                shapes.append(Shape(SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))], box))
                break
        else:
            return None
    return shapes


def random_scene(rng: np.random.Generator, index: int, detail: bool = False) -> Scene:
    """Rejection-sample canvas, shapes and (when `detail`) a small number until everything fits apart."""
    low = 384 if detail else 192  # detail canvases are large enough for the number to stay legible
    while True:
        width, height = (int(v) for v in rng.integers(low, 769, size=2))
        gap = max(4, min(width, height) // 40)
        if not 1 / 3 <= width / height <= 3 or (shapes := _place_shapes(rng, width, height, gap)) is None:
            continue
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        fmt = "png" if rng.random() < PNG_FRACTION else "jpg"
        if not detail:
            return Scene(index, width, height, background, tuple(shapes), fmt=fmt)
        number, size = str(int(rng.integers(10, 100))), max(10, round(height * rng.uniform(0.015, 0.03)))
        left, top, right, bottom = _font(size).getbbox(number, anchor="lt")
        for _attempt in range(100):
            x, y = int(rng.integers(gap, width - right - gap)), int(rng.integers(gap, height - bottom - gap))
            box = (x + left, y + top, x + right, y + bottom)
            if not any(_overlaps(box, s.box, gap) for s in shapes):
                return Scene(index, width, height, background, tuple(shapes), number, box, size, fmt)


def render(scene: Scene, output: Path) -> None:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.box
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    if scene.number is not None:
        font = _font(scene.number_size)
        left, top, _, _ = font.getbbox(scene.number, anchor="lt")
        origin = (scene.number_box[0] - left, scene.number_box[1] - top)
        draw.text(origin, scene.number, fill=TEXT_COLOR, font=font, anchor="lt")
    if scene.fmt == "png":
        image.save(output / scene.image, "PNG")
    else:
        image.save(output / scene.image, "JPEG", quality=90)

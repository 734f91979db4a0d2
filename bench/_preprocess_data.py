"""The data set of bench/preprocess.py: seeded synthetic images and LLaVA annotations, generated once and cached."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Cached under work/ and keyed by (n, seed, GENERATOR_VERSION): bump the version when the images change.
CACHE_ROOT = Path(__file__).resolve().parent.parent / "work" / "bench-preprocess"
GENERATOR_VERSION = 1
SIDE_MIN, SIDE_MAX, MAX_ASPECT = 640, 2048, 3.0
COMMON_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
PNG_FRACTION, EXIF_FRACTION = 0.10, 0.05
NOISE_SIGMA, NOISE_TILE = 5.0, 512
PROMPTS = (
    "Describe the image briefly.",
    "What is in this image?",
    "Give a short description of the picture.",
    "Write a caption for this image.",
)
FOLLOW_UPS = ("How many shapes are there?", "Which colour dominates?", "Is there a line in the picture?")


def plan(n: int, seed: int) -> list[dict[str, Any]]:
    """Per image: upright size, format, EXIF rotation and its conversation — a pure function of (n, seed)."""
    rng = np.random.default_rng([seed, 0])
    items = []
    for i in range(n):
        if rng.random() < 0.5:
            aspect = float(COMMON_RATIOS[rng.integers(len(COMMON_RATIOS))])  # width / height
        else:
            aspect = float(math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
        r = max(aspect, 1 / aspect)  # short side drawn so that the long side stays within SIDE_MAX
        short = int(rng.integers(SIDE_MIN, int(SIDE_MAX / r) + 1))
        long = min(SIDE_MAX, max(SIDE_MIN, round(short * r)))
        width, height = (long, short) if aspect >= 1 else (short, long)
        fmt = "png" if rng.random() < PNG_FRACTION else "jpg"
        rotated = fmt == "jpg" and rng.random() < EXIF_FRACTION
        n_shapes = int(rng.integers(5, 26))
        turns = [(f"<image>\n{PROMPTS[rng.integers(len(PROMPTS))]}", f"A picture of {n_shapes} shapes on a gradient.")]
        if rng.random() < 0.5:
            turns.append((FOLLOW_UPS[rng.integers(len(FOLLOW_UPS))], f"There are {n_shapes} shapes; look closely."))
        conversations = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        items.append(
            {
                "id": f"img-{i:06d}",
                "image": f"images/img_{i:06d}.{fmt}",
                "width": width,
                "height": height,
                "fmt": fmt,
                "exif_rotated": rotated,
                "n_shapes": n_shapes,
                "conversations": conversations,
            }
        )
    return items


def render(args: tuple[dict[str, Any], int, int, str]) -> int:
    """Write one image; returns its file size. Stored rotated (EXIF orientation 6) when `exif_rotated`."""
    item, seed, index, root = args
    rng = np.random.default_rng([seed, 1, index])
    w, h = (item["height"], item["width"]) if item["exif_rotated"] else (item["width"], item["height"])
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    c0, cx, cy = rng.uniform(40, 215, 3), rng.uniform(-100, 100, 3), rng.uniform(-100, 100, 3)
    base = (c0 + cx * x + cy * y).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(item["n_shapes"]):
        x1, x2 = sorted(int(v) for v in rng.integers(0, w, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, h, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
        elif kind == 1:
            draw.rectangle((x1, y1, x2, y2), fill=colour)
        else:
            draw.line((x1, y1, x2, y2), fill=colour, width=int(rng.integers(2, 24)))
    path = Path(root) / item["image"]
    if item["fmt"] == "png":
        image.save(path, "PNG")
    else:
        # Tiled Gaussian noise (a random offset into one 512² tile): JPEG codes 8×8 blocks independently, so
        # this compresses like full-frame noise at a fraction of the cost of drawing it.
        tile = np.random.default_rng([seed, 2]).normal(0.0, NOISE_SIGMA, (NOISE_TILE, NOISE_TILE, 3))
        oy, ox = (int(v) for v in rng.integers(0, NOISE_TILE, 2))
        reps = (h // NOISE_TILE + 2, w // NOISE_TILE + 2, 1)
        noise = np.tile(tile.astype(np.int16), reps)[oy : oy + h, ox : ox + w]
        pixels = (np.asarray(image, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        exif = Image.Exif()
        if item["exif_rotated"]:
            exif[0x0112] = 6  # display rotated 90° clockwise: stored h×w becomes upright w×h
        Image.fromarray(pixels).save(path, "JPEG", quality=int(rng.integers(80, 96)), exif=exif)
    return path.stat().st_size


def ensure_dataset(n: int, seed: int) -> tuple[Path, list[dict[str, Any]], float | None]:
    """The cached data set for (n, seed), generated on first use. Returns (root, plan, seconds spent generating)."""
    root = CACHE_ROOT / f"data-n{n}-seed{seed}-v{GENERATOR_VERSION}"
    items = plan(n, seed)
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()).get("images") == n:
        return root, items, None
    start = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sizes = list(pool.map(render, [(it, seed, i, str(root)) for i, it in enumerate(items)], chunksize=16))
    with (root / "annotations.jsonl").open("w") as f:
        for it in items:
            f.write(json.dumps({"id": it["id"], "image": it["image"], "conversations": it["conversations"]}) + "\n")
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"images": n, "seed": seed, "bytes": sum(sizes), "seconds": round(seconds, 1)}) + "\n")
    return root, items, seconds


def dataset_stats(root: Path, items: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = [(root / it["image"]).stat().st_size for it in items]
    jpg = [(s, it) for s, it in zip(sizes, items, strict=True) if it["fmt"] == "jpg"]
    aspects = [it["width"] / it["height"] for it in items]
    return {
        "images": len(items),
        "png": sum(it["fmt"] == "png" for it in items),
        "exif_rotated": sum(it["exif_rotated"] for it in items),
        "bytes_total": sum(sizes),
        "bytes_mean": sum(sizes) / len(sizes),
        "jpeg_bytes_per_pixel": sum(s for s, _ in jpg) / sum(it["width"] * it["height"] for _, it in jpg),
        "megapixels_mean": sum(it["width"] * it["height"] for it in items) / len(items) / 1e6,
        "side_range": [
            min(min(it["width"], it["height"]) for it in items),
            max(max(it["width"], it["height"]) for it in items),
        ],
        "aspect_range": [min(aspects), max(aspects)],
    }

"""`square` mode vs the released models' preprocessing: how far our pixels are from LLaVA's `pad` pipeline.

The reference is what ConvLLaVA's released models were trained on (LLaVA `image_aspect_ratio: pad`): LLaVA's
`expand2square` (fill `int(mean·255)` = (122, 116, 104), original pasted at `((side−w)//2, (side−h)//2)`), then
transformers' PIL-backed `CLIPImageProcessorPil` with shortest_edge = crop = R (PIL bicubic, rescale 1/255,
OpenAI-CLIP mean/std). In transformers 5.x the class named `CLIPImageProcessor` is the torchvision backend
(tensor bicubic with antialias), which is not what LLaVA ran; it is measured too, as a row `fast-vs-reference`.

Rows per photo × resolution, differences of the normalised (3, R, R) tensors against the reference:

- `ours`: `ConvLlavaImageProcessor(mode="square")` in memory — also what a `image_format: png` shard reads back.
- `png-shard` / `jpeg95-shard`: the resized image through the shard writer's `encode_image` and the reader's
  `load_image` + `normalize` (pipelines/worker.py, convllava/data/epochs.py).
- `jpeg95-444-shard`: the same at quality 95 without chroma subsampling (Pillow's default at q95 is 4:2:0) —
  not an option of the shard writer today; measured to size one.
- `old`: the previous `square` code (content resized to rounded sizes and pasted at rounded offsets, fill
  rounded to (123, 117, 104)), for contrast.

One 8-bit level is 1/(255·std) ≈ 0.0142–0.0150 normalised units, so a max difference ≤ 1/255 ≈ 0.0039 means the
uint8 pixels are identical. Run (about 15 s on 2 CPU cores):

    .venv/bin/python bench/square_pixels.py [--out bench/results/square_pixels.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

from convllava.data.sample_images import sample_photos
from convllava.processing.image_processing import ConvLlavaImageProcessor, load_image
from pipelines.worker import encode_image

PHOTOS = ("coffee", "chelsea", "rocket")
RESOLUTIONS = (256, 768, 1024, 1536)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "square_pixels.json"


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """LLaVA's expand2square, verbatim."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def reference(image: Image.Image, resolution: int, processor_class: type = CLIPImageProcessorPil) -> torch.Tensor:
    processor = processor_class(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}
    )
    square = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return torch.as_tensor(np.asarray(processor.preprocess(square, return_tensors="pt")["pixel_values"][0]))


def old_square(image: Image.Image, resolution: int) -> torch.Tensor:
    """The `square` mode before this change: resize the content, paste it at rounded offsets, rounded fill."""
    proc = ConvLlavaImageProcessor(resolution=resolution, mode="square")
    p = proc.target(*image.size)
    fill = tuple(int(round(m * 255)) for m in proc.config.mean)
    canvas = Image.new("RGB", (p.canvas_width, p.canvas_height), fill)
    canvas.paste(image.resize((p.content_width, p.content_height), Image.Resampling.BICUBIC), (p.offset_x, p.offset_y))
    return proc.normalize(canvas)


def shard_round_trip(image: Image.Image, resolution: int, image_format: str) -> torch.Tensor:
    proc = ConvLlavaImageProcessor(resolution=resolution, mode="square")
    resized, _ = proc.resize(image)
    if image_format == "jpeg-444":
        buf = io.BytesIO()
        resized.save(buf, format="JPEG", quality=95, subsampling=0)
        return proc.normalize(load_image(buf.getvalue()))
    return proc.normalize(load_image(encode_image(resized, image_format, jpeg_quality=95)))


def stats(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    d = (x - ref).abs()
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "frac_over_1_255": float((d > 1 / 255).float().mean()),
    }


def measure() -> list[dict]:
    photos = {p.name: p for p in sample_photos()}
    rows = []
    for name in PHOTOS:
        image = load_image(photos[name].path)
        for r in RESOLUTIONS:
            ref = reference(image, r)
            candidates = {
                "ours": ConvLlavaImageProcessor(resolution=r, mode="square").transform(image),
                "png-shard": shard_round_trip(image, r, "png"),
                "jpeg95-shard": shard_round_trip(image, r, "jpeg"),
                "jpeg95-444-shard": shard_round_trip(image, r, "jpeg-444"),
                "old": old_square(image, r),
                "fast-vs-reference": reference(image, r, CLIPImageProcessor),
            }
            for variant, x in candidates.items():
                rows.append(
                    {"photo": name, "size": list(image.size), "resolution": r, "variant": variant, **stats(x, ref)}
                )
    return rows


def markdown_table(rows: list[dict]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [
        "| photo (w×h) | R | " + " | ".join(f"{v} max / mean" for v in variants) + " |",
        "|---|---|" + "---|" * len(variants),
    ]
    keys = list(dict.fromkeys((r["photo"], tuple(r["size"]), r["resolution"]) for r in rows))
    for photo, size, res in keys:
        cells = [
            next(r for r in rows if (r["photo"], r["resolution"], r["variant"]) == (photo, res, v)) for v in variants
        ]
        lines.append(
            f"| {photo} ({size[0]}×{size[1]}) | {res} | "
            + " | ".join(f"{c['max_abs']:.3g} / {c['mean_abs']:.2g}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (default: %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = measure()
    elapsed = time.perf_counter() - start
    print(markdown_table(rows))
    print(
        f"\nAbsolute differences of normalised tensors vs the reference (1/255 = {1 / 255:.4f}). Took {elapsed:.1f} s."
    )

    payload = {
        "description": __doc__.splitlines()[0],
        "reference": "LLaVA expand2square(int(mean*255)) + transformers CLIPImageProcessorPil "
        "(shortest_edge = crop = R, PIL bicubic, rescale 1/255, OpenAI-CLIP mean/std)",
        "units": "absolute difference of normalised tensors; one 8-bit level = 1/(255*std) ~ 0.0146",
        "rows": rows,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pillow": PIL.__version__,
            "python": platform.python_version(),
        },
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

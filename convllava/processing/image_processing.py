"""Image loading and the three input modes: `square` (the paper's), `bucket` (our default), `short-side`.

Every mode returns an image whose sides are multiples of the tower's stride, plus the `Placement`
that maps coordinates between the original image and the model's input frame.

`square` reproduces the pixels the released models were trained on (LLaVA's `image_aspect_ratio: pad`):
expand the original to a max(w, h) square filled with `int(mean·255)`, pasted at `((side−w)//2, (side−h)//2)`,
then PIL-bicubic-resize the whole square to R×R — what transformers' PIL-backed `CLIPImageProcessorPil`
(the slow `CLIPImageProcessor` of LLaVA's era) does with shortest_edge = crop = R. The uint8 image is
identical to the reference's, so the normalised tensors agree to float rounding (tests/test_image_processing.py).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import model_validator
from transformers import BaseImageProcessor, BatchFeature

from convllava.io.config import ConfigModel
from convllava.processing.buckets import (  # MODES: re-exported (convllava.modeling.config, convllava.modeling.llava_checkpoint)
    MODES,  # noqa: F401
    STRIDE,
    Bucket,
    Mode,
    Placement,
    check_resolution,
    fit_in_canvas,
    make_buckets,
    nearest_bucket,
)

# OpenAI CLIP normalisation, used by the laion CLIP ConvNeXt the paper starts from.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be used; the message says which file and why."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Any PIL mode → 8-bit RGB. Transparency is composited over `background`; 16/32-bit greyscale is
    rescaled by its actual range (not clipped), CMYK/YCbCr/LAB go through PIL's converters."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) / (hi - lo) * 255.0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: str | os.PathLike | bytes,
    max_pixels: int = 64_000_000,
    background: tuple[int, int, int] = (0, 0, 0),
) -> Image.Image:
    """Open, fully decode, EXIF-rotate and convert an image to RGB. Animated images give their first frame.

    Raises:
        ImageError: missing, empty, truncated or non-image data, or more than `max_pixels` pixels
            (decompression bombs are refused before decoding).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: file not found")
        source = path.read_bytes()
    if not source:
        raise ImageError(f"{name}: file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(source)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit {max_pixels}")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image, background)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: decompression bomb refused ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e


class ImageProcessorConfig(ConfigModel):
    resolution: int = 768
    mode: Mode = "bucket"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_aspect: float = 4.0

    @model_validator(mode="after")
    def _check(self) -> ImageProcessorConfig:
        check_resolution(self.resolution)
        if min(self.std) <= 0:
            raise ValueError(f"mean/std: need three values each and positive std, got {self.mean} / {self.std}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        return self


class ConvLlavaImageProcessor(BaseImageProcessor):
    """Resize/pad to a stride-aligned size and normalise to a (3, H, W) float tensor.

    A transformers image processor: `processor(images, return_tensors="pt")` gives a `BatchFeature` whose
    `pixel_values` is a (B, 3, H, W) tensor when all images land on one size, else a list of (3, H, W) tensors (the
    model batches equal sizes). `transform(image)` is the one-image tensor that everything else builds on.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, config: ImageProcessorConfig | None = None, **kwargs) -> None:
        # `image_processor_type` is what `to_dict` writes for AutoImageProcessor; the other keys are the config's.
        kwargs.pop("image_processor_type", None)
        if config is not None and kwargs:
            raise TypeError(f"pass either an ImageProcessorConfig or its fields, not both (got {sorted(kwargs)})")
        super().__init__()
        self.config = config or ImageProcessorConfig(**_config_fields(kwargs))
        self.buckets = make_buckets(self.config.resolution, STRIDE, self.config.max_aspect)

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.config.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.config.std

    def to_dict(self) -> dict[str, Any]:
        return {"image_processor_type": type(self).__name__, **self.config.model_dump()}

    @property
    def fill(self) -> tuple[int, int, int]:
        """Padding colour: the normalisation mean in 8 bits, so padding is (nearly) zero after normalising.

        `square` truncates like LLaVA's `int(x * 255)` — (122, 116, 104) for CLIP's mean — so its pixels are the
        released models'; the other modes round to the nearest level, (123, 117, 104).
        """
        if self.config.mode == "square":
            return tuple(int(m * 255) for m in self.config.mean)
        return tuple(int(round(m * 255)) for m in self.config.mean)

    @staticmethod
    def square_frame(width: int, height: int) -> Placement:
        """LLaVA's expand2square at the original scale: a max(w, h) square with the image pasted centred on the
        short axis at the floored offset ((side − w)//2, (side − h)//2)."""
        side = max(width, height)
        return Placement(side, side, height, width, (side - height) // 2, (side - width) // 2)

    def target(self, width: int, height: int) -> Placement:
        """Where an image of this size lands in the model's input frame."""
        r = self.config.resolution
        if self.config.mode == "square":
            # The square frame scaled to r×r. The content's edges land at fractional positions (offset·r/side)
            # and are resampled together with the fill, so this placement is the exact one rounded to pixels.
            square = self.square_frame(width, height)
            s = r / square.canvas_height
            return Placement(
                r, r, round(height * s), round(width * s), round(square.offset_y * s), round(square.offset_x * s)
            )
        if self.config.mode == "bucket":
            b = nearest_bucket(width, height, self.buckets)
            return fit_in_canvas(width, height, b.height, b.width)
        # short-side: short side = r, long side rounded to the stride (small aspect change, no padding),
        # capped at max_aspect·r.
        short, long = min(width, height), max(width, height)
        long_px = min(int(self.config.max_aspect * r), max(STRIDE, round(long * r / short / STRIDE) * STRIDE))
        h, w = (r, long_px) if width >= height else (long_px, r)
        return Placement(h, w, h, w, 0, 0)

    def bucket_for(self, width: int, height: int) -> Bucket:
        p = self.target(width, height)
        return Bucket(p.canvas_height, p.canvas_width)

    def resize(self, image: Image.Image) -> tuple[Image.Image, Placement]:
        """The image at its model-input size (PIL, RGB) and its placement."""
        image = to_rgb(image, self.fill)
        p = self.target(*image.size)
        if self.config.mode == "square":
            # Pad first, then resize the whole square (not resize-then-paste): the content's edge pixels are
            # blended with the fill exactly as in the released models' preprocessing.
            square = self.square_frame(*image.size)
            if square.padded_fraction:
                canvas = Image.new("RGB", (square.canvas_width, square.canvas_height), self.fill)
                canvas.paste(image, (square.offset_x, square.offset_y))
                image = canvas
            return image.resize((p.canvas_width, p.canvas_height), Image.Resampling.BICUBIC), p
        content = image.resize((p.content_width, p.content_height), Image.Resampling.BICUBIC)
        if (p.content_height, p.content_width) == (p.canvas_height, p.canvas_width):
            return content, p
        canvas = Image.new("RGB", (p.canvas_width, p.canvas_height), self.fill)
        canvas.paste(content, (p.offset_x, p.offset_y))
        return canvas, p

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → (3, H, W) float32, CLIP-normalised."""
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.config.mean).view(3, 1, 1)
        std = torch.tensor(self.config.std).view(3, 1, 1)
        return (x - mean) / std

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One image at its model-input size, normalised: (3, H, W) float32."""
        resized, _ = self.resize(image)
        return self.normalize(resized)

    def preprocess(
        self, images: Image.Image | Sequence[Image.Image], return_tensors: str | None = None, **kwargs
    ) -> BatchFeature:
        """`pixel_values` of one image or a list: stacked (B, 3, H, W) when all sizes agree, else a list.

        Raises:
            TypeError: an unknown keyword (the resolution and mode are the processor's configuration).
            ValueError: `return_tensors` other than None or "pt".
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; set them in the ImageProcessorConfig instead")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        images = [images] if isinstance(images, Image.Image) else list(images)
        return BatchFeature({"pixel_values": stack_images([self.transform(image) for image in images])})


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
    """One (B, 3, H, W) tensor when all sizes agree, else the list (the model batches equal sizes); None for none."""
    if not images:
        return None
    if len({tuple(x.shape) for x in images}) == 1:
        return torch.stack(list(images))
    return list(images)


def _config_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """ImageProcessorConfig fields from keyword arguments or a saved dict (JSON gives lists for mean/std).

    Raises:
        TypeError: a key that is not a field, so a misspelt option is never silently dropped.
    """
    unknown = set(kwargs) - set(ImageProcessorConfig.model_fields)
    if unknown:
        raise TypeError(f"unknown image processor option(s) {sorted(unknown)}")
    return {k: tuple(v) if k in ("mean", "std") else v for k, v in kwargs.items()}

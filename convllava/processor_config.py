"""ProcessorConfig and its processor_config.json: the processor's validated settings, read back from a checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from convllava.image_processing import ImageProcessorConfig, _config_fields
from convllava.templates import TOKENIZATIONS, Tokenization, get_template

PROCESSOR_CONFIG = "processor_config.json"
Truncation = Literal["truncate", "error"]


@dataclass(frozen=True)
class ProcessorConfig:
    """Args:
    template: conversation template (`convllava.templates.TEMPLATES`).
    max_length: maximum tokens per sample, visual tokens included.
    truncation: `truncate` (never through an image) or `error`.
    tokenization: `one_pass` (our models) or `llava` (LLaVA's `tokenizer_image_token`, for released checkpoints).
    image: how images become pixel tensors.
    """

    template: str = "vicuna_v1"
    max_length: int = 2048
    truncation: Truncation = "truncate"
    tokenization: Tokenization = "one_pass"
    image: ImageProcessorConfig = ImageProcessorConfig()

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"truncation: expected 'truncate' or 'error', got {self.truncation!r}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization: expected one of {TOKENIZATIONS}, got {self.tokenization!r}")


def read_processor_config(directory: str | os.PathLike) -> ProcessorConfig:
    """The ProcessorConfig of a checkpoint's processor_config.json in either layout: the image settings under
    `image_processor` (what transformers' `ProcessorMixin` writes) or under `image` (checkpoints saved before)."""
    raw = json.loads((Path(directory) / PROCESSOR_CONFIG).read_text())
    raw.pop("processor_class", None)
    image = raw.pop("image_processor") if "image_processor" in raw else raw.pop("image", {})
    image.pop("image_processor_type", None)
    return ProcessorConfig(**raw, image=ImageProcessorConfig(**_config_fields(image)))

"""ProcessorConfig and its processor_config.json: the processor's validated settings, read back from a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from convllava.io.config import ConfigModel
from convllava.processing.image_processing import ImageProcessorConfig
from convllava.processing.templates import Tokenization, get_template

PROCESSOR_CONFIG = "processor_config.json"
Truncation = Literal["truncate", "error"]


class ProcessorConfig(ConfigModel):
    """Args:
    template: conversation template (`convllava.processing.templates.TEMPLATES`).
    max_length: maximum tokens per sample, visual tokens included.
    truncation: `truncate` (never through an image) or `error`.
    tokenization: `one_pass` (our models) or `llava` (LLaVA's `tokenizer_image_token`, for released checkpoints).
    image: how images become pixel tensors.
    """

    template: str = "vicuna_v1"
    max_length: int = 2048
    truncation: Truncation = "truncate"
    tokenization: Tokenization = "one_pass"
    image: ImageProcessorConfig = Field(default_factory=ImageProcessorConfig)

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        get_template(value)
        return value

    @field_validator("max_length")
    @classmethod
    def _long_enough(cls, value: int) -> int:
        if value < 8:
            raise ValueError(f"max_length must be at least 8, got {value}")
        return value


def read_processor_config(directory: str | os.PathLike) -> ProcessorConfig:
    """The ProcessorConfig of a checkpoint's processor_config.json in either layout: the image settings under
    `image_processor` (what transformers' `ProcessorMixin` writes) or under `image` (checkpoints saved before)."""
    path = Path(directory) / PROCESSOR_CONFIG
    raw = json.loads(path.read_text())
    raw.pop("processor_class", None)
    image = raw.pop("image_processor") if "image_processor" in raw else raw.pop("image", {})
    image.pop("image_processor_type", None)
    return ProcessorConfig.from_dict({**raw, "image": image}, str(path))

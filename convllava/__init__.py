"""ConvLLaVA models for transformers.

    import convllava
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint_dir)  # or AutoModelForCausalLM
    processor = AutoProcessor.from_pretrained(checkpoint_dir)
    batch = processor(images=[image], text=[prompt], return_tensors="pt")

Importing the package registers `convllava` with transformers' Auto classes (config, causal LM, image-text-to-text
model, processor, image processor), which needs the three modules that define them (torch, transformers and timm;
never Ray, DeepSpeed or MLflow). Everything else loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from convllava.config import ConvLlavaConfig
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import ConvLlavaProcessor

if TYPE_CHECKING:
    from convllava.checkpoint import load_model, save_checkpoint
    from convllava.image_processing import ConvLlavaImageProcessor, load_image
    from convllava.inference import GenerationOptions, generate

# Public names → the module that defines them, imported when the name is first used.
_LAZY = {
    "ConvLlavaImageProcessor": "convllava.image_processing",
    "load_image": "convllava.image_processing",
    "GenerationOptions": "convllava.inference",
    "generate": "convllava.inference",
    "load_model": "convllava.checkpoint",
    "save_checkpoint": "convllava.checkpoint",
}

__all__ = [
    "ConvLlavaConfig",
    "ConvLlavaForCausalLM",
    "ConvLlavaImageProcessor",
    "ConvLlavaProcessor",
    "GenerationOptions",
    "generate",
    "load_image",
    "load_model",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'convllava' has no attribute {name!r}")

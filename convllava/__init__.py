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

from transformers import AutoImageProcessor, AutoProcessor

from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.image_processing import ConvLlavaImageProcessor
from convllava.processing.processor import ConvLlavaProcessor

if TYPE_CHECKING:
    from convllava.modeling.checkpoint import load_model, save_checkpoint
    from convllava.modeling.inference import GenerationOptions, generate
    from convllava.processing.image_processing import load_image

# The processing room knows nothing of the model; the two meet here.
AutoProcessor.register(ConvLlavaConfig, ConvLlavaProcessor, exist_ok=True)
# One class for both of transformers' backend names: it resizes with PIL, as the released models' preprocessing did.
AutoImageProcessor.register(
    ConvLlavaConfig,
    image_processor_classes=dict.fromkeys(("pil", "torchvision"), ConvLlavaImageProcessor),
    exist_ok=True,
)

# Public names → the module that defines them, imported when the name is first used.
_LAZY = {
    "load_image": "convllava.processing.image_processing",
    "GenerationOptions": "convllava.modeling.inference",
    "generate": "convllava.modeling.inference",
    "load_model": "convllava.modeling.checkpoint",
    "save_checkpoint": "convllava.modeling.checkpoint",
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

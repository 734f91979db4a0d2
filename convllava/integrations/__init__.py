"""Adapters that let the standard VLM evaluation frameworks drive a ConvLLaVA checkpoint.

- `convllava.integrations.lmms_eval`: a model for lmms-eval (`lmms-eval --model convllava ...`), with task YAMLs in
  `convllava/integrations/lmms_eval_tasks/`. Needs the `eval` extra (lmms-eval).
- `convllava.integrations.vlmevalkit`: a model for VLMEvalKit (`generate(message)` on interleaved image/text
  messages). Subclasses VLMEvalKit's `BaseModel` when `vlmeval` is importable; works without it.

Both answer through `generate_interleaved`: the prompt building and decoding of `convllava.modeling.inference.generate`, with
any number of images per question, each at its `<image>` tag.

This package imports neither framework; each adapter module imports its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from convllava.modeling.checkpoint import load_model
from convllava.modeling.inference import GenerationOptions, _generate_ids
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.image_processing import load_image, to_rgb
from convllava.processing.processor import ConvLlavaProcessor

LMMS_EVAL_MODEL_NAME = "convllava"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_eval(
    pretrained: str | os.PathLike,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor]:
    """A checkpoint (our format, local or `s3://`) in eval mode on `device`.

    Args:
        device: "cuda", "cuda:1", "cpu"; default: cuda when available.
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16" or "float16".

    Raises:
        ValueError: an unknown dtype.
        CheckpointError: a directory that is not a convllava checkpoint.
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    model, processor = load_model(pretrained, dtype=torch_dtype, attn_implementation=attn_implementation)
    return model.to(target), processor


def as_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image or a local file.

    Raises:
        ImageError: a missing, empty or undecodable file (the message names it).
        ValueError: a URL (nothing is downloaded; fetch the file first) or another type.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (str, os.PathLike)):
        if str(source).startswith(("http://", "https://", "s3://")):
            raise ValueError(f"image {str(source)!r} is a URL; download it and pass the local path")
        return load_image(source)
    raise ValueError(f"expected an image path or a PIL image, got {type(source).__name__}")


def generate_interleaved(
    model: ConvLlavaForCausalLM,
    processor: ConvLlavaProcessor,
    prompts: Sequence[tuple[str, Sequence[Image.Image]]],
    options: GenerationOptions | None = None,
    system: str | None = None,
    sample_ids: Sequence[str] | None = None,
) -> list[str]:
    """Answer a batch of single-turn prompts, each with any number of images.

    The prompts are built by `ConvLlavaProcessor.generation_batch`, as `convllava.modeling.inference.generate` builds them:
    each prompt's images fill its `<image>` tags in order, and a prompt with images but no tag gets one tag per image
    prepended, so both give the same answer for one image.

    Args:
        prompts: (text, images) pairs; text-only prompts have no images.
        sample_ids: named in errors (defaults to the prompt's index).

    Raises:
        ConversationError: a prompt's `<image>` tags do not match its images one to one, or its text is empty.
    """
    batch = processor.generation_batch(prompts, system=system, sample_ids=sample_ids)
    return [processor.decode(ids) for ids in _generate_ids(model, processor, batch, options or GenerationOptions())]


def lmms_eval_manifest():
    """lmms-eval's model manifest for `convllava` (the payload of our `lmms_eval.models` entry point).

    lmms-eval (0.6+) reads the entry-point group `lmms_eval.models` when `lmms_eval.models` is imported; the
    class is imported only when the model is requested.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=LMMS_EVAL_MODEL_NAME, simple_class_path="convllava.integrations.lmms_eval.ConvLlavaLmms"
    )

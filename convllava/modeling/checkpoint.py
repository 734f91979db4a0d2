"""Our checkpoint format, saved and loaded; `load_model` also takes a released LLaVA-layout directory as it is.

Our format is what `save_pretrained` writes: config.json (`convllava`), model.safetensors, processor files. The
released layout is read by `convllava.modeling.llava_checkpoint`; weight files by `convllava.modeling.weights`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from convllava.io.storage import resolve_local
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.llava_checkpoint import from_llava_checkpoint, released_image_settings
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.weights import CheckpointError
from convllava.processing.processor import ConvLlavaProcessor
from convllava.processing.processor_config import PROCESSOR_CONFIG, read_processor_config


def image_settings(path: str | os.PathLike) -> dict[str, Any]:
    """`{"resolution", "mode"}` of a checkpoint in our format or the released layout, from its config files only
    (no weights are read): what a driver needs to bucket images before the model is loaded anywhere."""
    directory = resolve_local(path)
    if (directory / PROCESSOR_CONFIG).is_file():
        image = read_processor_config(directory).image
        return {"resolution": image.resolution, "mode": image.mode}
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{path}: neither {PROCESSOR_CONFIG} (our format) nor a LLaVA config.json")
    return released_image_settings(directory, raw)


def is_convllava_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` holds a checkpoint of our own format (config.json model_type convllava, safetensors weights),
    as opposed to a released LLaVA-layout one."""
    directory = resolve_local(path)
    config = directory / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != ConvLlavaConfig.model_type:
        return False
    return any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor]:
    """Load a checkpoint (local or `s3://`): model (eval mode) and processor.

    Our format loads with `from_pretrained`; a released LLaVA-layout directory (`"model_type": "llava"`) loads with
    `from_llava_checkpoint` (its tower from config.json's `mm_vision_tower`, its dtype as stored unless `dtype` is
    given), so `convllava chat` / `eval` / `predict` take either without a conversion step.
    """
    directory = resolve_local(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; is this a convllava checkpoint directory?")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type == "llava":
        model, processor = from_llava_checkpoint(directory, dtype=dtype or "auto")
        if processor is None:
            raise CheckpointError(f"{path}: no tokenizer files (tokenizer.model or tokenizer.json) next to config.json")
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        return model, processor
    if model_type != ConvLlavaConfig.model_type:
        raise CheckpointError(
            f"{path}/config.json has model_type={model_type!r}; for a released LLaVA-layout checkpoint use "
            "`convllava convert` (or ConvLlavaForCausalLM.from_llava_checkpoint)"
        )
    if not any((directory / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        raise CheckpointError(
            f"{path}: no model.safetensors; convllava checkpoints load from safetensors only"
            + (f" (pickle-based {', '.join(found)} is never loaded here)" if found else "")
            + "; re-save the model with save_pretrained(safe_serialization=True)"
        )
    model = ConvLlavaForCausalLM.from_pretrained(str(directory), use_safetensors=True, **kwargs)
    return model.eval(), ConvLlavaProcessor.from_pretrained(directory)


def save_checkpoint(model: ConvLlavaForCausalLM, processor: ConvLlavaProcessor, directory: str | os.PathLike) -> Path:
    """Write model (safetensors) and processor into one directory in our format."""
    directory = Path(directory)
    model.save_pretrained(str(directory), safe_serialization=True)
    processor.save_pretrained(directory)
    return directory

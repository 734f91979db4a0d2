"""Loading a released ConvLLaVA checkpoint (LLaVA layout) into a ConvLlavaForCausalLM and its processor.

Released layout (ConvLLaVA/ConvLLaVA-{pretrain,sft}-{768,1024,1536}):
- an LLM directory: LLaVA-style `config.json` (`"model_type": "llava"`, `mm_projector_type`,
  `mm_hidden_size`, `mm_vision_tower`), LLM weights plus `model.mm_projector.{0,2}.*` in PyTorch `.bin`
  files (sharded with `pytorch_model.bin.index.json`) or safetensors, and the tokenizer;
- a vision tower directory: a Hugging Face `ConvNextModel` checkpoint with five stages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from convllava.io.storage import is_s3, resolve_local
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.vision import checkpoint_filter_fn
from convllava.modeling.weights import (
    Assigner,
    CheckpointError,
    empty_model,
    finish_loading,
    iter_shards,
    load_weight_file,
    weight_files,
)
from convllava.processing.image_processing import MODES
from convllava.processing.processor import ConvLlavaProcessor
from convllava.processing.tokenizer import load_tokenizer

# LLaVA's `architectures` entry → the Hugging Face model_type of its language model.
LLAVA_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaQwen2ForCausalLM": "qwen2",
}
_LLAVA_KEYS = (
    "mm_vision_tower",
    "mm_hidden_size",
    "mm_projector_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_patch_merge_type",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "mm_projector_lr",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "use_mm_proj",
    "mm_vision_tower_lr",
    "unfreeze_mm_vision_tower",
    "vision_tower",
    "mm_vision_resolution",
    "architectures",
    "model_type",
    "_name_or_path",
    "transformers_version",
    # The stored weights' dtype (released configs say float16/bfloat16). Left in the text config it would build
    # the LM in that dtype next to a float32 tower; the model's dtype is the `dtype` argument's choice instead.
    "torch_dtype",
    "dtype",
)
# LLaVA options that change what the model computes or sees, with the one value this loader reproduces (the value
# of every ConvLLaVA release). Any other value is refused: ignoring it would load a model that silently differs.
_LLAVA_OPTIONS = {
    "mm_vision_select_layer": (-1, "ConvLLaVA's -2 drops the last block of the last stage, which this tower keeps"),
    "mm_use_im_start_end": (False, "the processor does not wrap images in <im_start>/<im_end> tokens"),
    "mm_patch_merge_type": ("flat", "visual tokens are the flattened feature map, with no spatial merge"),
}
_PROJECTOR_PREFIX = "model.mm_projector."
_TOWER_PREFIX = "model.vision_tower.vision_tower."


def _tower_keys(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Hugging Face ConvNext keys → the timm tower's (`checkpoint_filter_fn`), with the source named on failure."""
    try:
        return checkpoint_filter_fn(state)
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from e


def _resolve_dtype(dtype: torch.dtype | str | None, raw: dict[str, Any], config_path: Path) -> torch.dtype:
    """None → float32; "auto" → the dtype config.json says the weights are stored in (float32 if it says none)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be a torch.dtype, 'auto' or None, got {dtype!r}")
    stored = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    resolved = getattr(torch, str(stored), None)
    if not (isinstance(resolved, torch.dtype) and resolved.is_floating_point):
        raise CheckpointError(f"{config_path}: torch_dtype={stored!r} is not a floating-point torch dtype")
    return resolved


def _tower_dir(llm_dir: Path, config: dict[str, Any], vision_tower: str | os.PathLike | None) -> Path:
    candidate = vision_tower or config.get("mm_vision_tower") or config.get("vision_tower")
    if candidate is None:
        raise CheckpointError(
            f"{llm_dir}/config.json has no mm_vision_tower; pass the tower directory (--vision-tower)"
        )
    if is_s3(candidate):
        return resolve_local(candidate)
    for path in (Path(candidate).expanduser(), llm_dir / str(candidate), llm_dir.parent / str(candidate)):
        if (path / "config.json").is_file():
            return path
    raise CheckpointError(
        f"vision tower {candidate!r} (from {'--vision-tower' if vision_tower else 'mm_vision_tower'}) is not a local "
        "directory with a config.json; download it and pass its path with --vision-tower"
    )


def _llava_image_settings(
    raw: dict[str, Any], tower_dir: Path, tower_config: dict[str, Any], resolution: int | None, image_mode: str | None
) -> tuple[int, str]:
    """Resolution (the tower config's `image_size` unless given) and mode (`square` for `image_aspect_ratio: pad`)."""
    if resolution is None:
        size = tower_config.get("image_size")
        if not (isinstance(size, int) and size % 64 == 0):
            raise CheckpointError(f"{tower_dir}/config.json has image_size={size!r}; pass the resolution (e.g. 1536)")
        resolution = size
    if image_mode is None:
        image_mode = "square" if raw.get("image_aspect_ratio", "pad") == "pad" else "bucket"
    if image_mode not in MODES:
        raise CheckpointError(f"image_mode must be one of {MODES}, got {image_mode!r}")
    return resolution, image_mode


def released_image_settings(directory: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """`{"resolution", "mode"}` of a released checkpoint from its config.json (`raw`) and its tower's config.json,
    as `from_llava_checkpoint` resolves them by default; no weights are read."""
    tower_dir = _tower_dir(directory, raw, None)
    resolution, mode = _llava_image_settings(
        raw, tower_dir, json.loads((tower_dir / "config.json").read_text()), None, None
    )
    return {"resolution": resolution, "mode": mode}


def from_llava_checkpoint(
    path: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    resolution: int | None = None,
    image_mode: str | None = None,
    template: str = "vicuna_v1",
    text_model_type: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor | None]:
    """Build a ConvLlavaForCausalLM from a released ConvLLaVA checkpoint.

    Args:
        path: the LLM directory (local or `s3://`).
        vision_tower: the HF ConvNextModel directory; defaults to `mm_vision_tower` from config.json. Its config.json
            gives the architecture (and default resolution); when the LLM checkpoint holds
            `model.vision_tower.vision_tower.*` weights itself, those are loaded instead of the directory's weights.
        resolution: input resolution; defaults to the tower config's `image_size` when it is a multiple of 64.
        image_mode: defaults to `square` for `image_aspect_ratio: pad` (the paper's preprocessing).
        text_model_type: the LM's model_type when config.json's `architectures` is not one LLaVA uses.
        dtype: of every floating-point parameter, tower included; None: float32; "auto": the dtype config.json says
            the weights are stored in (`torch_dtype`; float16 for the released checkpoints), float32 if it says none.
            Non-persistent buffers (rotary `inv_freq`) come out as `from_pretrained` makes them (float32).

    The weights are loaded as `from_pretrained` loads them: the model is built on the meta device (no memory, no
    random init), and the shards are read one at a time, memory-mapped, each tensor converted to `dtype` and
    assigned into the model; a tensor already in `dtype` is used as it is, backed by the file's pages. At most one
    copy of the weights plus one shard is in memory.

    Returns:
        The model and, when the directory has a tokenizer, its processor.

    Raises:
        CheckpointError: naming the file, field or key that does not fit.
    """
    llm_dir = resolve_local(path)
    config_path = llm_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{llm_dir}: no config.json")
    raw = json.loads(config_path.read_text())
    for key in ("mm_hidden_size", "hidden_size", "vocab_size"):
        if key not in raw:
            raise CheckpointError(f"{config_path}: field {key!r} is missing; is this a LLaVA checkpoint?")
    for key, (supported, why) in _LLAVA_OPTIONS.items():
        if raw.get(key, supported) != supported:
            raise CheckpointError(f"{config_path}: {key}={raw[key]!r} is not supported (only {supported!r}): {why}")
    if text_model_type is None:
        arch = (raw.get("architectures") or [None])[0]
        if arch not in LLAVA_ARCHITECTURES:
            raise CheckpointError(
                f"{config_path}: architectures={raw.get('architectures')} is not one of {sorted(LLAVA_ARCHITECTURES)}; "
                "pass text_model_type (e.g. 'llama')"
            )
        text_model_type = LLAVA_ARCHITECTURES[arch]
    projector_type = raw.get("mm_projector_type", "linear")  # LLaVA's own default when the key is absent
    text_config = AutoConfig.for_model(text_model_type, **{k: v for k, v in raw.items() if k not in _LLAVA_KEYS})

    dtype = _resolve_dtype(dtype, raw, config_path)
    llm_files = weight_files(llm_dir)  # a missing shard is named before anything is read
    # Opened (memory-mapped, nothing read yet) before the tower: a refused weights file is reported first.
    first_shard: dict[str, torch.Tensor] | None = load_weight_file(llm_files[0])
    tower_dir = _tower_dir(llm_dir, raw, vision_tower)
    tower_cfg_src = json.loads((tower_dir / "config.json").read_text())
    depths, dims = list(tower_cfg_src.get("depths", [])), list(tower_cfg_src.get("hidden_sizes", []))
    if len(depths) != 5 or len(dims) != 5:
        raise CheckpointError(
            f"{tower_dir}/config.json: ConvLLaVA towers have 5 stages, got depths={depths}, hidden_sizes={dims}"
        )
    if dims[-1] != raw["mm_hidden_size"]:
        raise CheckpointError(
            f"{config_path}: mm_hidden_size={raw['mm_hidden_size']} but the tower's last width is {dims[-1]}"
        )
    resolution, image_mode = _llava_image_settings(raw, tower_dir, tower_cfg_src, resolution, image_mode)

    tokenizer = None
    if any((llm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = load_tokenizer(llm_dir)
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    else:
        image_token_id = text_config.vocab_size
    config = ConvLlavaConfig(
        text_config=text_config,
        vision_depths=depths[:4],
        vision_dims=dims[:4],
        vision_stage5_depth=depths[4],
        vision_stage5_dim=dims[4],
        projector_type=projector_type,
        image_token_id=image_token_id,
        image_resolution=resolution,
        image_mode=image_mode,
        template=template,
    )
    # One copy of the weights, as from_pretrained loads: the model is built on the meta device and each shard's
    # tensors are converted to `dtype` and assigned into it, one shard at a time.
    model = empty_model(config, dtype)
    tower = Assigner(model.vision_tower.model, f"vision tower ({llm_dir})", dtype)
    projector = Assigner(model.projector, f"projector ({llm_dir}, keys {_PROJECTOR_PREFIX}*)", dtype)
    # Old Llama checkpoints carry rotary inv_freq buffers, which current transformers recomputes.
    lm = Assigner(model.language_model, f"language model ({llm_dir})", dtype, ignore=("rotary_emb.inv_freq",))
    tower_in_llm = False
    for file in llm_files:
        shard = first_shard if first_shard is not None else load_weight_file(file)
        first_shard = None
        # Stage-2 checkpoints may carry the (fine-tuned) tower inside the LLM weights; they win over the tower dir.
        tower_part = {k[len(_TOWER_PREFIX) :]: v for k, v in shard.items() if k.startswith(_TOWER_PREFIX)}
        if tower_part:
            tower_in_llm = True
            tower.assign(_tower_keys(tower_part, llm_dir), file)
        projector.assign(
            {k[len(_PROJECTOR_PREFIX) :]: v for k, v in shard.items() if k.startswith(_PROJECTOR_PREFIX)}, file
        )
        lm.assign(
            {k: v for k, v in shard.items() if not k.startswith((_PROJECTOR_PREFIX, "model.vision_tower."))}, file
        )
        del shard, tower_part  # this shard's tensors live on only as the model's parameters
    if not tower_in_llm:
        tower.what = f"vision tower ({tower_dir})"
        for file, shard in iter_shards(tower_dir):
            tower.assign(_tower_keys(shard, tower_dir), file)
    for part in (tower, projector, lm):
        part.check()
    finish_loading(model)
    # The released models were trained on LLaVA's tokenizer_image_token sequences (a `▁` after every image).
    processor = ConvLlavaProcessor.for_model(config, tokenizer, tokenization="llava") if tokenizer else None
    return model.eval(), processor

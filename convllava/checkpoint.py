"""Loading the released ConvLLaVA checkpoints (LLaVA layout) and our own format.

Released layout (ConvLLaVA/ConvLLaVA-{pretrain,sft}-{768,1024,1536}):
- an LLM directory: LLaVA-style `config.json` (`"model_type": "llava"`, `mm_projector_type`,
  `mm_hidden_size`, `mm_vision_tower`), LLM weights plus `model.mm_projector.{0,2}.*` in PyTorch `.bin`
  files (sharded with `pytorch_model.bin.index.json`) or safetensors, and the tokenizer;
- a vision tower directory: a Hugging Face `ConvNextModel` checkpoint with five stages.

Our format is what `save_pretrained` writes: config.json (`convllava`), model.safetensors, processor files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from convllava.config import ConvLlavaConfig
from convllava.image_processing import MODES
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import ConvLlavaProcessor
from convllava.storage import is_s3, resolve_local
from convllava.tokenizer import load_tokenizer
from convllava.vision import checkpoint_filter_fn

# LLaVA's `architectures` entry → the Hugging Face model_type of its language model.
LLAVA_ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
    "LlavaQwen2ForCausalLM": "qwen2",
}
_LLAVA_KEYS = (
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type", "image_aspect_ratio", "image_grid_pinpoints",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "mm_projector_lr", "tokenizer_model_max_length",
    "tokenizer_padding_side", "use_mm_proj", "mm_vision_tower_lr", "unfreeze_mm_vision_tower", "vision_tower",
    "mm_vision_resolution", "architectures", "model_type", "_name_or_path", "transformers_version",
    # The stored weights' dtype (released configs say float16/bfloat16). Left in the text config it would build
    # the LM in that dtype next to a float32 tower; the model's dtype is the `dtype` argument's choice instead.
    "torch_dtype", "dtype",
)  # fmt: skip
# LLaVA options that change what the model computes or sees, with the one value this loader reproduces (the value
# of every ConvLLaVA release). Any other value is refused: ignoring it would load a model that silently differs.
_LLAVA_OPTIONS = {
    "mm_vision_select_layer": (-1, "ConvLLaVA's -2 drops the last block of the last stage, which this tower keeps"),
    "mm_use_im_start_end": (False, "the processor does not wrap images in <im_start>/<im_end> tokens"),
    "mm_patch_merge_type": ("flat", "visual tokens are the flattened feature map, with no spatial merge"),
}
_PROJECTOR_PREFIX = "model.mm_projector."
_TOWER_PREFIX = "model.vision_tower.vision_tower."


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or key."""


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch `.bin` weights file, as data: weights_only=True refuses every pickled object but tensors and plain
    containers, so a crafted file cannot run code. mmap only for the zip format (torch rejects it for legacy files).

    Raises:
        CheckpointError: naming the file, when it holds anything else.
    """
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        detail = next((line for line in str(e).splitlines() if "unsupported" in line.lower()), str(e).splitlines()[0])
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, not only tensors ({detail.strip()}); "
            "loading them could run code. Use a checkpoint in safetensors format, or one you can vouch for converted "
            "to it"
        ) from e


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors preferred, `.bin` loaded with weights_only=True."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", lambda p: load_file(str(p))),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} is missing")
                state.update(loader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")  # a checkpoint is data; never unpickle objects from it
    raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")


def _load_into(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, ignore: tuple[str, ...] = ()
) -> None:
    state = {k: v for k, v in state.items() if not k.endswith(ignore)}
    result = module.load_state_dict(state, strict=False)
    # A tied parameter (lm_head.weight = embed_tokens.weight) is filled through the key it shares storage with;
    # save_pretrained stores such a tensor once, so its second name is absent from the checkpoint.
    own = module.state_dict(keep_vars=True)
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in result.missing_keys if not k.endswith(ignore) and id(own[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})"
        )


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


def from_llava_checkpoint(
    path: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    resolution: int | None = None,
    image_mode: str | None = None,
    template: str = "vicuna_v1",
    text_model_type: str | None = None,
    dtype: torch.dtype | None = None,
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

    state = load_state_dict(llm_dir)
    tower_dir = _tower_dir(llm_dir, raw, vision_tower)
    tower_cfg_src = json.loads((tower_dir / "config.json").read_text())
    # Stage-2 checkpoints may carry the (fine-tuned) tower inside the LLM weights; they win over the tower dir.
    tower_state = {k[len(_TOWER_PREFIX) :]: v for k, v in state.items() if k.startswith(_TOWER_PREFIX)}
    tower_source = llm_dir if tower_state else tower_dir
    tower_state = tower_state or load_state_dict(tower_dir)
    depths, dims = list(tower_cfg_src.get("depths", [])), list(tower_cfg_src.get("hidden_sizes", []))
    if len(depths) != 5 or len(dims) != 5:
        raise CheckpointError(
            f"{tower_dir}/config.json: ConvLLaVA towers have 5 stages, got depths={depths}, hidden_sizes={dims}"
        )
    if dims[-1] != raw["mm_hidden_size"]:
        raise CheckpointError(
            f"{config_path}: mm_hidden_size={raw['mm_hidden_size']} but the tower's last width is {dims[-1]}"
        )
    if resolution is None:
        size = tower_cfg_src.get("image_size")
        if not (isinstance(size, int) and size % 64 == 0):
            raise CheckpointError(f"{tower_dir}/config.json has image_size={size!r}; pass the resolution (e.g. 1536)")
        resolution = size
    if image_mode is None:
        image_mode = "square" if raw.get("image_aspect_ratio", "pad") == "pad" else "bucket"
    if image_mode not in MODES:
        raise CheckpointError(f"image_mode must be one of {MODES}, got {image_mode!r}")

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
    model = ConvLlavaForCausalLM(config)
    projector_state = {k[len(_PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(_PROJECTOR_PREFIX)}
    lm_state = {k: v for k, v in state.items() if not k.startswith((_PROJECTOR_PREFIX, "model.vision_tower."))}
    try:
        tower_state = checkpoint_filter_fn(tower_state)
    except KeyError as e:
        raise CheckpointError(f"{tower_source}: {e.args[0]}") from e
    _load_into(model.vision_tower.model, tower_state, f"vision tower ({tower_source})")
    _load_into(model.projector, projector_state, f"projector ({llm_dir}, keys {_PROJECTOR_PREFIX}*)")
    # Old Llama checkpoints carry rotary inv_freq buffers, which current transformers recomputes.
    _load_into(model.language_model, lm_state, f"language model ({llm_dir})", ignore=("rotary_emb.inv_freq",))
    if model.config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    processor = ConvLlavaProcessor.for_model(config, tokenizer) if tokenizer is not None else None
    return model.eval(), processor


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor]:
    """Load a checkpoint in our format (local or `s3://`): model (eval mode) and processor."""
    directory = resolve_local(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; is this a convllava checkpoint directory?")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
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

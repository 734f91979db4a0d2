"""Loading the released ConvLLaVA checkpoints (LLaVA layout) and our own format.

Released layout (ConvLLaVA/ConvLLaVA-{pretrain,sft}-{768,1024,1536}):
- an LLM directory: LLaVA-style `config.json` (`"model_type": "llava"`, `mm_projector_type`,
  `mm_hidden_size`, `mm_vision_tower`), LLM weights plus `model.mm_projector.{0,2}.*` in PyTorch `.bin`
  files (sharded with `pytorch_model.bin.index.json`) or safetensors, and the tokenizer;
- a vision tower directory: a Hugging Face `ConvNextModel` checkpoint with five stages.

Our format is what `save_pretrained` writes: config.json (`convllava`), model.safetensors, processor files.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig
from transformers.modeling_utils import local_torch_dtype

from convllava.config import ConvLlavaConfig
from convllava.image_processing import MODES
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import PROCESSOR_CONFIG, ConvLlavaProcessor
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


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in load order: safetensors preferred, every shard of an index.

    Raises:
        CheckpointError: naming the missing shard, or the directory when it has no weights.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            for shard in shards:
                if not (directory / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} is missing")
            return [directory / shard for shard in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file's tensors, memory-mapped (safetensors; zip `.bin` via `_load_bin`): nothing is read until used."""
    from safetensors.torch import load_file

    return load_file(str(path)) if path.suffix == ".safetensors" else _load_bin(path)


def iter_shards(directory: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """A checkpoint directory's tensors one weight file at a time, so that a caller holds at most one shard."""
    for path in _weight_files(directory):
        yield path, _load_file(path)


class FlatRanges:
    """Ranges of a safetensors checkpoint's tensors, each read as if the tensor were flattened, touching only the rows
    that hold the range: a ZeRO-3 rank fills its partition of every parameter from disk, never holding a whole one.

    Raises:
        CheckpointError: when the directory has no safetensors weights, or a tensor is not in them.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.directory = resolve_local(directory)
        files = [p for p in _weight_files(self.directory) if p.suffix == ".safetensors"]
        if not files:
            raise CheckpointError(f"{self.directory}: ranges are read from safetensors weights only")
        self._handles = [safe_open(str(path), framework="pt") for path in files]
        self._where = {key: handle for handle in self._handles for key in handle.keys()}

    def keys(self) -> set[str]:
        return set(self._where)

    def read(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of tensor `name` flattened in row-major order, as a 1-D tensor of its stored dtype."""
        if name not in self._where:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        part = self._where[name].get_slice(name)
        shape = part.get_shape()
        if len(shape) == 0:
            return self._where[name].get_tensor(name).reshape(-1)[start:end]
        row = 1
        for size in shape[1:]:
            row *= size
        first, last = start // row, -(-end // row)
        rows = part[first:last]
        return rows.reshape(-1)[start - first * row : end - first * row]


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors preferred, `.bin` loaded with weights_only=True."""
    state: dict[str, torch.Tensor] = {}
    for _, shard in iter_shards(directory):
        state.update(shard)
    return state


class _Assigner:
    """Puts checkpoint tensors into one module as shards arrive, converted to the model's dtype and assigned in place
    of the module's meta tensors (no copy when the dtype already fits), and reports what no shard filled.

    Args:
        module: a module built on the meta device.
        what: names the module and its source in errors.
        dtype: the dtype floating-point tensors are converted to.
        ignore: key suffixes that are neither loaded nor missing (e.g. rotary inv_freq buffers of old checkpoints).
    """

    def __init__(self, module: torch.nn.Module, what: str, dtype: torch.dtype, ignore: tuple[str, ...] = ()) -> None:
        self.module, self.what, self.dtype, self.ignore = module, what, dtype, ignore
        # The meta tensors are kept, so their ids stay unique: tied names (lm_head.weight = embed_tokens.weight) share
        # one tensor, and save_pretrained stores such a tensor once; its second name is filled through the first.
        self.expected = module.state_dict(keep_vars=True)
        self.filled: set[str] = set()
        self.unexpected: list[str] = []

    def assign(self, state: dict[str, torch.Tensor], source: Path) -> None:
        state = {
            k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items() if not k.endswith(self.ignore)
        }
        try:
            result = self.module.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # a tensor whose shape does not fit the model
            raise CheckpointError(f"{self.what}: {source}: {e}") from e
        self.unexpected += result.unexpected_keys
        self.filled.update(k for k in state if k in self.expected)

    def check(self) -> None:
        """Raises: CheckpointError: counting and naming missing and unexpected keys."""
        filled = {id(self.expected[k]) for k in self.filled}
        missing = [
            k for k, v in self.expected.items()
            if k not in self.filled and not k.endswith(self.ignore) and id(v) not in filled
        ]  # fmt: skip
        if missing or self.unexpected:
            raise CheckpointError(
                f"{self.what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(self.unexpected)} unexpected keys (e.g. {self.unexpected[:3]})"
            )


def _empty_model(config: ConvLlavaConfig, dtype: torch.dtype) -> ConvLlavaForCausalLM:
    """The model with every parameter and buffer on the meta device: no memory and no random init, as
    `from_pretrained` builds it (`PreTrainedModel.get_init_context`). Built under `dtype` as the default dtype, so
    that buffers made in the default dtype come out as from_pretrained makes them."""
    with torch.device("meta"), local_torch_dtype(dtype, ConvLlavaForCausalLM.__name__):
        return ConvLlavaForCausalLM(config)


def _finish_loading(model: ConvLlavaForCausalLM) -> None:
    """Tie, then compute the non-persistent buffers (rotary `inv_freq`), which no checkpoint holds, the way
    `from_pretrained` does: a real tensor in place of each, filled by the model's own `_init_weights`. The loaded
    tensors are marked initialised first, which the `transformers.initialization` functions respect.

    Raises:
        CheckpointError: naming the parameters and buffers that are still on the meta device.
    """
    if model.config.tie_word_embeddings:
        model.tie_weights()
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if not tensor.is_meta:
            tensor._is_hf_initialized = True
    for name, buffer in list(model.named_non_persistent_buffers()):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, torch.empty_like(buffer, device="cpu"))
    model.initialize_weights()
    on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"{len(on_meta)} parameters or buffers were not loaded (e.g. {on_meta[:3]}); they are in no checkpoint file "
            "and the model does not compute them"
        )


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


def image_settings(path: str | os.PathLike) -> dict[str, Any]:
    """`{"resolution", "mode"}` of a checkpoint in our format or the released layout, from its config files only
    (no weights are read): what a driver needs to bucket images before the model is loaded anywhere."""
    directory = resolve_local(path)
    processor_config = directory / PROCESSOR_CONFIG
    if processor_config.is_file():
        image = json.loads(processor_config.read_text()).get("image", {})
        return {"resolution": image["resolution"], "mode": image["mode"]}
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{path}: neither {PROCESSOR_CONFIG} (our format) nor a LLaVA config.json")
    tower_dir = _tower_dir(directory, raw, None)
    resolution, mode = _llava_image_settings(raw, tower_dir, json.loads((tower_dir / "config.json").read_text()),
                                             None, None)  # fmt: skip
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
    llm_files = _weight_files(llm_dir)  # a missing shard is named before anything is read
    # Opened (memory-mapped, nothing read yet) before the tower: a refused weights file is reported first.
    first_shard: dict[str, torch.Tensor] | None = _load_file(llm_files[0])
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
    model = _empty_model(config, dtype)
    tower = _Assigner(model.vision_tower.model, f"vision tower ({llm_dir})", dtype)
    projector = _Assigner(model.projector, f"projector ({llm_dir}, keys {_PROJECTOR_PREFIX}*)", dtype)
    # Old Llama checkpoints carry rotary inv_freq buffers, which current transformers recomputes.
    lm = _Assigner(model.language_model, f"language model ({llm_dir})", dtype, ignore=("rotary_emb.inv_freq",))
    tower_in_llm = False
    for file in llm_files:
        shard = first_shard if first_shard is not None else _load_file(file)
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
    _finish_loading(model)
    # The released models were trained on LLaVA's tokenizer_image_token sequences (a `▁` after every image).
    processor = ConvLlavaProcessor.for_model(config, tokenizer, tokenization="llava") if tokenizer else None
    return model.eval(), processor


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

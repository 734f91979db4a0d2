"""Checkpoint weight files: finding and safely reading them, and assigning them into a model built on the meta device.

Both checkpoint layouts go through here: our own (`convllava.modeling.checkpoint`; `FlatRanges` for ZeRO-3 partitions) and the
released LLaVA one (`convllava.modeling.llava_checkpoint`), which loads shard by shard as `from_pretrained` does.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.modeling_utils import local_torch_dtype

from convllava.io.storage import resolve_local
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM


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


def weight_files(directory: Path) -> list[Path]:
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


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """One weight file's tensors, memory-mapped (safetensors; zip `.bin` via `_load_bin`): nothing is read until used."""
    from safetensors.torch import load_file

    return load_file(str(path)) if path.suffix == ".safetensors" else _load_bin(path)


def iter_shards(directory: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """A checkpoint directory's tensors one weight file at a time, so that a caller holds at most one shard."""
    for path in weight_files(directory):
        yield path, load_weight_file(path)


class FlatRanges:
    """Ranges of a safetensors checkpoint's tensors, each read as if the tensor were flattened, touching only the rows
    that hold the range: a ZeRO-3 rank fills its partition of every parameter from disk, never holding a whole one.

    Raises:
        CheckpointError: when the directory has no safetensors weights, or a tensor is not in them.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.directory = resolve_local(directory)
        files = [p for p in weight_files(self.directory) if p.suffix == ".safetensors"]
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


class Assigner:
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
            k
            for k, v in self.expected.items()
            if k not in self.filled and not k.endswith(self.ignore) and id(v) not in filled
        ]
        if missing or self.unexpected:
            raise CheckpointError(
                f"{self.what}: {len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(self.unexpected)} unexpected keys (e.g. {self.unexpected[:3]})"
            )


def empty_model(config: ConvLlavaConfig, dtype: torch.dtype) -> ConvLlavaForCausalLM:
    """The model with every parameter and buffer on the meta device: no memory and no random init, as
    `from_pretrained` builds it (`PreTrainedModel.get_init_context`). Built under `dtype` as the default dtype, so
    that buffers made in the default dtype come out as from_pretrained makes them."""
    with torch.device("meta"), local_torch_dtype(dtype, ConvLlavaForCausalLM.__name__):
        return ConvLlavaForCausalLM(config)


def finish_loading(model: ConvLlavaForCausalLM) -> None:
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

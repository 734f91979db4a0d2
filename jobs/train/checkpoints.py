"""The training checkpoint's on-disk contract: completion markers, RNG state, and verification on disk or in storage.

A checkpoint directory holds `deepspeed/` (DeepSpeed's state), `model/` (the consolidated Hugging Face model),
`rng/rankN.json` (every rank's RNG states), `trainer_state.json` (rank 0: step, data position, run) and one
`COMPLETE.rankN.json` per rank, written last, listing every file that rank wrote with its size and sha256.
`StageRecipe` writes it; the local runner and the Ray Train driver verify it before resuming from or recording it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convllava.storage import listing

TRAINER_STATE = "trainer_state.json"


class CheckpointIncomplete(RuntimeError):
    """A checkpoint directory missing a file that its completion markers list (never used, never recorded)."""


def rng_state() -> dict[str, Any]:
    """This process's torch, NumPy and Python RNG states as JSON (what `rng/rankN.json` holds)."""
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": _jsonable(np.random.get_state()),
        "python": _jsonable(random.getstate()),
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Set this process's RNGs back to what `rng_state` recorded."""
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(rng["torch"]), dtype=np.uint8).copy()))
    np.random.set_state(_from_jsonable(rng["numpy"]))
    random.setstate(_from_jsonable(rng["python"]))


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return {"__nd__": obj.tolist()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict) and "__nd__" in obj:
        return np.array(obj["__nd__"], dtype=np.uint32)
    if isinstance(obj, list):
        return tuple(_from_jsonable(x) for x in obj)
    return obj


def write_completion_marker(directory: Path, rank: int) -> None:
    """Record every file this rank wrote, with size and sha256; written last, so its presence means complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("COMPLETE")):
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    (directory / f"COMPLETE.rank{rank}.json").write_text(json.dumps({"rank": rank, "files": files}, indent=1))


def verify_checkpoint(directory: Path, world_size: int) -> dict[str, Any]:
    """Check that every rank's completion marker is present and every file it lists is intact.

    Raises:
        CheckpointIncomplete: naming the missing marker or the missing/corrupt file.
    """
    listed: dict[str, Any] = {}
    for rank in range(world_size):
        marker = directory / f"COMPLETE.rank{rank}.json"
        if not marker.is_file():
            raise CheckpointIncomplete(f"{directory}: rank {rank} never finished writing (no {marker.name})")
        listed.update(json.loads(marker.read_text())["files"])
    for rel, meta in listed.items():
        path = directory / rel
        if not path.is_file() or path.stat().st_size != meta["size"] or _sha256(path) != meta["sha256"]:
            raise CheckpointIncomplete(f"{directory}: {rel} is missing or differs from what was written")
    _consolidated_model_files(listed, str(directory))
    if not (directory / TRAINER_STATE).is_file():
        raise CheckpointIncomplete(f"{directory}: no trainer state")
    return json.loads((directory / TRAINER_STATE).read_text())


def _consolidated_model_files(files: Any, where: str) -> None:
    """A consolidated model is `model/model.safetensors`, or an index and every shard it names (save_pretrained
    shards a 7B model). `files` answers `in` for relative paths.

    Raises:
        CheckpointIncomplete: naming what is missing.
    """
    if "model/model.safetensors" in files:
        return
    if "model/model.safetensors.index.json" not in files:
        raise CheckpointIncomplete(f"{where}: no consolidated model (model/model.safetensors or its index)")


def verify_stored_checkpoint(filesystem, path: str, world_size: int) -> dict[str, Any]:
    """`verify_checkpoint` for a checkpoint in its storage, without downloading it: every rank's completion marker
    must be there, and every file a marker lists must be in the storage listing with the size the rank wrote
    (the ranks checked the bytes against their sha256 before uploading, and `upload_checkpoint` the stored sizes).
    Only the markers, the shard index and the trainer state are read. Returns the trainer state.

    Raises:
        CheckpointIncomplete: naming the missing marker, or the missing or short file.
    """
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    root = path.rstrip("/")
    stored = {rel: info.size for rel, info in listing(fs, root).items()}

    def read(rel: str) -> Any:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            return json.loads(f.read())

    listed: dict[str, Any] = {}
    for rank in range(world_size):
        marker = f"COMPLETE.rank{rank}.json"
        if marker not in stored:
            raise CheckpointIncomplete(f"{root}: rank {rank} never finished writing (no {marker})")
        listed.update(read(marker)["files"])
    for rel, meta in sorted(listed.items()):
        if stored.get(rel) != meta["size"]:
            size = "missing" if rel not in stored else f"{stored[rel]} bytes"
            raise CheckpointIncomplete(f"{root}: {rel} is {size} in storage; rank wrote {meta['size']} bytes")
    _consolidated_model_files(listed, root)
    if "model/model.safetensors.index.json" in listed:
        shards = set(read("model/model.safetensors.index.json")["weight_map"].values())
        lost = sorted(s for s in shards if f"model/{s}" not in listed)
        if lost:
            raise CheckpointIncomplete(f"{root}: model shards {lost} named by the index were never written")
    if TRAINER_STATE not in listed:
        raise CheckpointIncomplete(f"{root}: no trainer state")
    return read(TRAINER_STATE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

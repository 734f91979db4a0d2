"""The training checkpoint's on-disk contract: completion markers, RNG state, and verification on disk or in storage.

A checkpoint directory holds `state/` (the training state as safetensors + JSON, restorable at any world size:
`jobs.train.states`), `model/` (the consolidated Hugging Face model), `rng/rankN.json` (every rank's RNG states),
`trainer_state.json` (rank 0: step, data position, world size, run) and one `COMPLETE.rankN.json` per rank, written
last, listing every file that rank wrote with its size and sha256. `StageRecipe` writes it; the local runner and the
Ray Train workers and driver verify it before resuming from or recording it. Nothing in it is ever unpickled: a
checkpoint holding a pickle (DeepSpeed's own `.pt` states, or anything else) is refused, naming the file.
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

from convllava.io.storage import listing

TRAINER_STATE = "trainer_state.json"


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


class CheckpointIncomplete(RuntimeError):
    """A checkpoint directory missing a file that its completion markers list (never used, never recorded)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint holding a file that only unpickling could read: refused, never loaded."""


class StoredCheckpoint:
    """A checkpoint folder on local disk or in its storage (`fs`: a pyarrow filesystem; None for local paths): what
    a resume reads of it, file by file (no download of the whole)."""

    def __init__(self, root: str | Path, fs=None) -> None:
        import pyarrow.fs as pafs

        self.fs = fs or pafs.LocalFileSystem()
        self.root = str(root).rstrip("/")
        self.where = self.root if fs is None else f"{type(fs).__name__}:{self.root}"

    def json(self, rel: str) -> Any:
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return json.loads(f.read())


def reseed(seed: int, step: int, rank: int) -> None:
    """Every RNG of this process from (seed, step, rank): a rank resumed at another world size has no saved state."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:4], "little")
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def refuse_pickles(files, where: str) -> None:
    """Raises UnsafeCheckpoint naming the first file of `files` (relative paths) that would need unpickling."""
    for rel in sorted(files):
        if rel.endswith(PICKLE_SUFFIXES) or "/deepspeed/" in f"/{rel}":
            raise UnsafeCheckpoint(
                f"{where}: refused: {rel} is a pickle (DeepSpeed's own checkpoint format, or another); loading it "
                "could run any code its writer chose. convllava resumes only from safetensors and JSON (`state/`); "
                "resume from a checkpoint written by this version, or start the stage again"
            )


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


def verify_checkpoint(directory: Path, world_size: int | None = None) -> dict[str, Any]:
    """Check that every rank's completion marker is present and every file it lists is intact (`world_size`: the
    ranks that wrote it; by default what its trainer state says).

    Raises:
        CheckpointIncomplete: naming the missing marker or the missing/corrupt file.
        UnsafeCheckpoint: a file in it is a pickle.
    """
    if world_size is None:
        world_size = _written_by(directory / TRAINER_STATE, str(directory), lambda p: json.loads(Path(p).read_text()))
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
    refuse_pickles(listed, str(directory))
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


def _written_by(path, where: str, read) -> int:
    """The world size a checkpoint's trainer state records (the ranks whose markers it needs)."""
    try:
        return int(read(path)["world_size"])
    except FileNotFoundError as e:
        raise CheckpointIncomplete(f"{where}: no trainer state") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointIncomplete(f"{where}: unreadable trainer state ({e})") from e


def verify_stored_checkpoint(filesystem, path: str, world_size: int | None = None) -> dict[str, Any]:
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
    read = StoredCheckpoint(root, fs).json
    if world_size is None:
        world_size = _written_by(TRAINER_STATE, root, read)
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
    refuse_pickles(listed, root)
    _consolidated_model_files(listed, root)
    if "model/model.safetensors.index.json" in listed:
        shards = set(read("model/model.safetensors.index.json")["weight_map"].values())
        lost = sorted(s for s in shards if f"model/{s}" not in listed)
        if lost:
            raise CheckpointIncomplete(f"{root}: model shards {lost} named by the index were never written")
    if TRAINER_STATE not in listed:
        raise CheckpointIncomplete(f"{root}: no trainer state")
    return read(TRAINER_STATE)


def newest_complete(filesystem, run_root: str) -> tuple[str, dict[str, Any]] | None:
    """(path, trainer state) of the newest checkpoint under `run_root` (a run's folder in its storage) that is
    complete there: every rank's marker, every file it lists at its size (`verify_stored_checkpoint`); checked newest
    first. Whether Ray Train registered it does not matter: a failure in the second after the last rank's upload,
    before the controller recorded it, loses nothing. None when there is none."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    try:
        entries = fs.get_file_info(pafs.FileSelector(run_root.rstrip("/"), allow_not_found=True))
    except OSError:
        return None
    found = sorted(
        (e.path for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    for path in found:
        try:
            return path, verify_stored_checkpoint(filesystem, path)
        except (CheckpointIncomplete, OSError, ValueError):
            continue
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

"""The training state a checkpoint resumes from, written so that any world size can restore it and nothing is
unpickled: safetensors for the tensors, JSON for the rest.

DeepSpeed's ZeRO keeps, per rank, a slice of every trainable parameter's fp32 master weights and Adam moments;
which slice depends on the world size (ZeRO-1/2 cut each parameter group's flat buffer into equal partitions, ZeRO-3
each parameter). Its own checkpoints store those slices as pickles (`torch.load(weights_only=False)` on restore) and
can be read back only at the world size that wrote them. Here each rank writes its slices as *fragments* of the
flattened parameters, named by parameter and located by element offset:

    state/rank{r}.safetensors   "{name}::fp32" / "::exp_avg" / "::exp_avg_sq": elements [start, start+numel) of the
                                flattened parameter `name` that rank r held
    state/rank{r}.json          {"fragments": {name: {"start", "numel", "sha256": {kind: hex}}}, "rank", ...}
    state/optimizer.json        (rank 0) parameter shapes and groups, Adam's step and hyperparameters per group,
                                the LR scheduler and the engine's counters, the world size and ZeRO stage

A rank restoring at any world size asks each parameter's new slice of `StateSource`, which reads only the fragments
that overlap it (a byte range of the safetensors file each, from local disk or object storage), checks each one's
sha256 before using it, and refuses a file that is not safetensors. Resharding is a copy of exactly the saved
elements: restore at N → M → N gives back the same bits.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_DIR = "state"
OPTIMIZER_JSON = "optimizer.json"
FORMAT = 1
KINDS = ("fp32", "exp_avg", "exp_avg_sq")
ADAM_KEYS = KINDS[1:]
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header


class StateError(ValueError):
    """A training state that cannot be restored; the message names the checkpoint file and what is wrong."""


@dataclass
class Fragment:
    """Elements [start, start+numel) of the flattened parameter `name`, held by this rank: `views[kind]` are the
    live tensors (views into DeepSpeed's flat fp32 partition and its Adam moments) of exactly those elements."""

    name: str
    start: int
    numel: int
    views: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------- engine


def _zero_optimizer(engine):
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2, 3):
        raise StateError(f"resumable training state needs DeepSpeed ZeRO stage 1, 2 or 3, not {stage}")
    optimizer = engine.optimizer
    if getattr(optimizer, "swap_optimizer", False) or getattr(optimizer, "params_in_nvme_and_cpu", False):
        raise StateError("resumable training state does not support ZeRO-Infinity's NVMe offload")
    return stage, optimizer


def _flat_groups(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions Adam steps on, one per (sub)group, in the optimizer's order."""
    stage, opt = _zero_optimizer(engine)
    return list(opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups)


def fragments(engine, *, create_states: bool = False, step: int = 0) -> Iterator[Fragment]:
    """This rank's fragments of every trainable parameter, for any ZeRO stage 1–3.

    Adam's moments exist only after its first step; with `create_states` they are made (zeros, at `step`) where
    missing, so a restore can fill them before training resumes."""
    stage, opt = _zero_optimizer(engine)
    names = opt.param_names
    flats = _flat_groups(engine)
    for flat in flats:
        state = opt.optimizer.state[flat]
        if create_states and not all(k in state for k in ADAM_KEYS):
            state["step"] = torch.tensor(float(step))
            for key in ADAM_KEYS:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    if stage == 3:
        import torch.distributed as dist

        for i, group in enumerate(opt.fp16_groups):
            flat = flats[i]
            state = opt.optimizer.state[flat]
            for param in group:
                _, offset, count = opt.grad_position[opt.get_param_id(param)]
                rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
                start = rank * count
                numel = max(0, min(count, param.ds_numel - start))  # the last slice is padded
                if numel == 0:
                    continue
                views = {"fp32": flat.narrow(0, offset, numel)}
                views.update({k: state[k].narrow(0, offset, numel) for k in ADAM_KEYS if k in state})
                yield Fragment(names[param], start, numel, views)
        return
    for i, group in enumerate(opt.bit16_groups):
        flat = flats[i]
        state = opt.optimizer.state[flat]
        for param in group:
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no element of it in this rank's partition
                continue
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            views = {"fp32": flat.narrow(0, hp.start, hp.numel)}
            views.update({k: state[k].narrow(0, hp.start, hp.numel) for k in ADAM_KEYS if k in state})
            yield Fragment(names[param], lp.start, lp.numel, views)


def _params(engine) -> dict[str, dict[str, Any]]:
    """Every trainable parameter's shape, element count and optimizer group."""
    stage, opt = _zero_optimizer(engine)
    groups = opt.fp16_groups if stage == 3 else opt.bit16_groups
    out = {}
    for g, group in enumerate(groups):
        for param in group:
            shape = list(param.ds_shape) if stage == 3 else list(param.shape)
            numel = int(param.ds_numel) if stage == 3 else param.numel()
            out[opt.param_names[param]] = {"shape": shape, "numel": numel, "group": g}
    return out


def _global_state(engine, scheduler) -> dict[str, Any]:
    _, opt = _zero_optimizer(engine)
    groups = []
    for group in opt.optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params" and _jsonable(v)})
    steps = []
    for flat in _flat_groups(engine):
        step = opt.optimizer.state[flat].get("step", 0)
        steps.append(int(step.item() if torch.is_tensor(step) else step))
    sched = scheduler.state_dict() if scheduler is not None else {}
    return {
        "format": FORMAT,
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": engine.world_size,
        "params": _params(engine),
        "param_groups": groups,
        "adam_steps": steps,
        "scheduler": {k: sched[k] for k in ("last_epoch", "_step_count", "_last_lr", "base_lrs") if k in sched},
        "engine": {
            k: int(getattr(engine, k)) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")
        },
    }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def save_state(engine, scheduler, directory: Path, rank: int) -> None:
    """Write this rank's fragments (and, on rank 0, the global state) under `directory/state/`."""
    from safetensors.torch import save_file

    out = directory / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, Any] = {}
    for frag in fragments(engine):
        missing = [k for k in KINDS if k not in frag.views]
        if missing:  # before Adam's first step: nothing to resume that a fresh start would not rebuild
            raise StateError(f"parameter {frag.name}: no optimizer state {missing} to save (no step taken yet)")
        digests = {}
        for kind in KINDS:
            tensor = frag.views[kind].detach().to("cpu", copy=True).contiguous()
            tensors[f"{frag.name}::{kind}"] = tensor
            digests[kind] = _digest(tensor)
        index[frag.name] = {"start": frag.start, "numel": frag.numel, "sha256": digests}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    meta = {"format": FORMAT, "rank": rank, "world_size": engine.world_size, "fragments": index}
    (out / f"rank{rank}.json").write_text(json.dumps(meta))
    if rank == 0:
        (out / OPTIMIZER_JSON).write_text(json.dumps(_global_state(engine, scheduler), indent=1))


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest()


def load_state(engine, scheduler, source: StateSource) -> dict[str, Any]:
    """Fill this rank's fp32 master weights and Adam moments from `source`, whatever world size wrote it, then the
    model's own (lower-precision) weights from them, the optimizer's steps and hyperparameters, the scheduler and the
    engine's counters. Returns the saved global state.

    Raises:
        StateError: a parameter the state lacks or holds with another shape, a fragment that is missing, differs
            from its digest or is not safetensors; naming the file.
    """
    saved = source.global_state
    stage, opt = _zero_optimizer(engine)
    params = _params(engine)
    for name, info in params.items():
        have = saved["params"].get(name)
        if have is None or have["numel"] != info["numel"]:
            why = "is not in it" if have is None else f"has {have['numel']} elements there, {info['numel']} here"
            raise StateError(f"{source.where}: trainable parameter {name} {why}")
    steps = saved["adam_steps"]
    try:
        with torch.no_grad():  # the fp32 masters are leaves that require grad
            for frag in fragments(engine, create_states=True, step=steps[0] if steps else 0):
                for kind in KINDS:
                    frag.views[kind].copy_(source.read(frag.name, kind, frag.start, frag.start + frag.numel))
    finally:
        source.close()
    for flat, step in zip(_flat_groups(engine), _group_steps(steps, len(_flat_groups(engine))), strict=True):
        state = opt.optimizer.state[flat]
        state["step"] = torch.tensor(float(step)) if torch.is_tensor(state.get("step")) else step
    for group, hyper in zip(opt.optimizer.param_groups, saved["param_groups"], strict=True):
        for key, value in hyper.items():
            if key in group and key != "params":  # JSON made tuples (Adam's betas) lists
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
    if scheduler is not None and saved.get("scheduler"):
        sched = scheduler.state_dict()
        sched.update(saved["scheduler"])
        scheduler.load_state_dict(sched)
        for group, lr in zip(opt.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    for key, value in saved.get("engine", {}).items():
        setattr(engine, key, value)
    with torch.no_grad():
        _update_model_weights(engine, stage, opt)
    return saved


def _group_steps(steps: list[int], n: int) -> list[int]:
    """Adam's step per flat group: the same for all (every group steps together), whatever the grouping."""
    if len(set(steps)) > 1:
        raise StateError(f"optimizer groups at different steps {steps}")
    return [steps[0] if steps else 0] * n


def _update_model_weights(engine, stage: int, opt) -> None:
    """The model's weights from the restored fp32 masters, as DeepSpeed's own loaders leave them."""
    if stage == 3:
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            if flat.numel() > 0:
                opt._reassign_or_swap_out_partitioned_parameters(i)
        return
    opt.update_lp_params()
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # DeepSpeed's views of the moments, per parameter
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


# ---------------------------------------------------------------------------------------------------------- reading


class StateSource:
    """A saved state in a checkpoint folder, on local disk or in object storage (`fs`: a pyarrow filesystem, None
    for local paths), read by byte ranges: each rank fetches only the fragments that overlap its slices.

    Raises (on construction):
        StateError: no state, a format this version does not know, or a rank's index missing.
    """

    def __init__(self, root: str | Path, fs=None) -> None:
        import pyarrow.fs as pafs

        self.fs = fs or pafs.LocalFileSystem()
        self.root = str(root).rstrip("/")
        self.where = f"{self.root}/{STATE_DIR}"
        self.global_state = self._json(OPTIMIZER_JSON)
        if self.global_state.get("format") != FORMAT:
            raise StateError(f"{self.where}/{OPTIMIZER_JSON}: state format {self.global_state.get('format')}")
        self.world_size = int(self.global_state["world_size"])
        self.by_name: dict[str, list[tuple[int, int, int, dict]]] = {}  # name → (start, numel, rank, digests)
        for rank in range(self.world_size):
            for name, f in self._json(f"rank{rank}.json")["fragments"].items():
                self.by_name.setdefault(name, []).append((f["start"], f["numel"], rank, f["sha256"]))
        for frags in self.by_name.values():
            frags.sort()
        self._headers: dict[int, tuple[int, dict]] = {}
        self._files: dict[int, Any] = {}  # one open file per rank's safetensors (a request per range, no re-open)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, rank: int):
        if rank not in self._files:
            self._files[rank] = self.fs.open_input_file(self._path(f"rank{rank}.safetensors"))
        return self._files[rank]

    def _path(self, name: str) -> str:
        return f"{self.where}/{name}"

    def _json(self, name: str) -> dict[str, Any]:
        try:
            with self.fs.open_input_stream(self._path(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError as e:
            raise StateError(f"{self._path(name)} is missing: the checkpoint holds no resumable state") from e
        except (OSError, ValueError) as e:
            raise StateError(f"{self._path(name)}: not a readable JSON state ({e})") from e

    def _header(self, rank: int) -> tuple[int, dict]:
        """(offset of the data, the safetensors header) of rank's file; refuses anything that is not safetensors."""
        if rank not in self._headers:
            path = self._path(f"rank{rank}.safetensors")
            f = self._file(rank)
            head = f.read_at(8, 0)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, f.size() - 8):
                raise StateError(f"{path}: not a safetensors file (refused: only safetensors and JSON are read)")
            try:
                header = json.loads(f.read_at(n, 8))
            except ValueError as e:
                raise StateError(f"{path}: not a safetensors file ({e}; refused)") from e
            self._headers[rank] = (8 + n, header)
        return self._headers[rank]

    def read(self, name: str, kind: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened parameter `name`'s `kind`, from the fragments that hold them."""
        out = torch.empty(end - start, dtype=torch.float32)
        covered = 0
        for f_start, f_numel, rank, digests in self.by_name.get(name, []):
            lo, hi = max(start, f_start), min(end, f_start + f_numel)
            if lo >= hi:
                continue
            frag = self._fragment(rank, name, kind, f_numel, digests[kind])
            out[lo - start : hi - start] = frag[lo - f_start : hi - f_start]
            covered += hi - lo
        if covered != end - start:
            raise StateError(
                f"{self.where}: parameter {name} elements [{start}, {end}) are not all saved "
                f"({covered} of {end - start} found in the ranks' fragments)"
            )
        return out

    def _fragment(self, rank: int, name: str, kind: str, numel: int, digest: str) -> torch.Tensor:
        path = self._path(f"rank{rank}.safetensors")
        data_start, header = self._header(rank)
        entry = header.get(f"{name}::{kind}")
        if entry is None:
            raise StateError(f"{path}: no tensor {name}::{kind} though rank{rank}.json lists it")
        dtype = _DTYPES.get(entry.get("dtype"))
        begin, stop = entry["data_offsets"]
        if dtype is None or stop - begin != numel * torch.finfo(dtype).bits // 8:
            raise StateError(f"{path}: tensor {name}::{kind} is {entry.get('dtype')} of {stop - begin} bytes")
        raw = self._file(rank).read_at(stop - begin, data_start + begin)
        if len(raw) != stop - begin or hashlib.sha256(raw).hexdigest() != digest:
            raise StateError(f"{path}: tensor {name}::{kind} differs from the digest its rank recorded")
        return torch.frombuffer(bytearray(raw), dtype=dtype).to(torch.float32)

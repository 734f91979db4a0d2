"""The stage recipe: one class, one lifecycle (setup → train → save_checkpoint), all three stages.

It runs in every training process: a Ray Train worker (`jobs.train`) or a plain process, alone or under `torchrun`
(`jobs.local`). Where checkpoints go and where metrics go are the caller's (`CheckpointSink`, `MetricSink`); the
recipe imports neither Ray nor MLflow. A stage is only configuration: trainable groups, learning rates, data,
schedule, DeepSpeed JSON. Resumption is exact: a checkpoint holds DeepSpeed's state, the step counter, every
rank's RNG state and the data position (a step index into the seeded epoch plan), so a restarted run replays
nothing and skips nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from convllava.attention import attention_unavailable, resolve_attn_implementation
from convllava.checkpoint import is_convllava_checkpoint, load_model
from convllava.config import ConvLlavaConfig
from convllava.data import collate, plan_epoch
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import ConvLlavaProcessor
from convllava.storage import resolve_local
from convllava.trainable import format_table, param_group, set_trainable, trainable_table
from jobs.shards import ShardSet
from jobs.stage_config import StageConfig
from jobs.strategy import DeepSpeedStrategy

TRAINER_STATE = "trainer_state.json"


class CheckpointIncomplete(RuntimeError):
    """A checkpoint directory missing a file that its completion markers list (never used, never recorded)."""


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(total_steps * warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


@dataclass
class StageResult:
    """What a finished stage hands on, however it ran (Ray Train or local processes)."""

    name: str
    checkpoint_uri: str  # the whole checkpoint (DeepSpeed state + model), for resuming
    model_uri: str  # the consolidated Hugging Face-format model: what the next stage initialises from
    steps: int
    metrics: dict[str, float]
    run_id: str | None
    unlogged_steps: list[int] = field(default_factory=list)  # steps whose metrics MLflow never stored
    resumed_from: int = 0  # the step this run started at (0: from the beginning)


class CheckpointSink(Protocol):
    """Where a finished checkpoint goes. `publish` is called on every rank with that rank's folder (its part written
    and its completion marker last); the folder is deleted after. Ray Train's sink reports it to the controller,
    which uploads it; a local sink copies it under the run's folder."""

    def publish(self, directory: Path, step: int, metrics: dict[str, float]) -> None: ...


class MetricSink(Protocol):
    """Rank 0's metrics. `log` must not block training; `unsent` are `[key, value, timestamp, step]` rows not yet
    stored (a checkpoint carries them), `requeue` takes such rows back after a restart; `close` flushes."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def unsent(self) -> list[list]: ...

    def requeue(self, rows: list[list]) -> None: ...

    def close(self) -> Any: ...


class StageRecipe:
    """One training stage in one process of `world_size`: builds the model the ZeRO stage needs, restores a
    checkpoint exactly, trains to `total_steps`, and hands checkpoints and metrics to the sinks it was given.

    Args:
        checkpoints: where checkpoints go (every rank).
        metrics: where rank 0's metrics go (None: not recorded; other ranks always None).
        run_id: the tracking run a checkpoint records it belongs to.
    """

    def __init__(self, config: StageConfig, rank: int, world_size: int, *, checkpoints: CheckpointSink,
                 metrics: MetricSink | None = None, run_id: str | None = None,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        self.config, self.rank, self.world_size = config, rank, world_size
        self.checkpoints, self.logger, self.run_id = checkpoints, metrics if rank == 0 else None, run_id
        # The device this worker computes on (Ray Train's `get_device()`); the engine's device once it exists.
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.step = 0
        self.unsent_metrics: list[list] = []  # [key, value, timestamp, step] rows the metric sink has not stored

    # ------------------------------------------------------------------ setup
    def setup(self, checkpoint_dir: Path | None) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.shards = ShardSet(c.data)
        self.strategy = DeepSpeedStrategy(c, self.world_size)
        model, self.processor = self.build_model()
        self._check_data_matches_model(model)
        model.train()  # `load_model` returns an inference-mode model; training needs dropout and drop-path back
        set_trainable(model, c.trainable)
        if c.gradient_checkpointing:
            model.activation_checkpointing_enable()
        rows = trainable_table(model)
        self.table = format_table(rows)
        if self.rank == 0:  # one line here; the table per module goes to the run (trainable_parameters.txt)
            trainable, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
            groups = ", ".join(name for name, t, _ in rows if t)
            print(f"[{c.name}] trainable parameters: {trainable:,} of {total:,} ({groups})", flush=True)

        self.steps_per_epoch = self._plan(0).num_steps
        self.total_steps = c.epochs * self.steps_per_epoch
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        optimizer = torch.optim.AdamW(self._param_groups(model), lr=c.lr, weight_decay=c.weight_decay)
        schedule = lr_lambda(self.total_steps, c.warmup_ratio, c.schedule)
        self.engine, self.scheduler = self.strategy.setup(
            model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        )
        self.device = torch.device(self.engine.device)
        self.collectives = DeviceCollectives(self.device)
        if checkpoint_dir is not None:
            self._restore(checkpoint_dir)
        if self.logger is not None:
            self.logger.requeue(self.unsent_metrics)  # metrics the checkpoint's run could not send before it stopped
            if self.step == 0:
                self.logger.log_text(self.table, "trainable_parameters.txt")

    def build_model(self) -> tuple[ConvLlavaForCausalLM, ConvLlavaProcessor]:
        """The model and processor, built the way the configured ZeRO stage needs.

        Under ZeRO-3 the strategy's `model_context` makes transformers build inside `deepspeed.zero.Init`: each rank
        creates only its partition of every parameter as the module is made, and `from_pretrained` loads a
        checkpoint into the partitioned model (rank 0 reads the memory-mapped files, the other ranks only the keys).
        The attention kernel is what the config asks for when this worker can run it (`resolve_attn_implementation`).
        """
        c = self.config
        requested = c.attn_implementation
        if c.init_from and requested is None:
            requested = ConvLlavaConfig.from_pretrained(resolve_local(c.init_from)).text_config._attn_implementation
        attn = resolve_attn_implementation(requested, self.device)
        self.attn_implementation = attn
        if self.rank == 0 and attn != requested and requested is not None:
            print(f"[{c.name}] attention: {attn} ({requested} requested: {attention_unavailable(requested, self.device)})",
                  flush=True)  # fmt: skip
        with self.strategy.model_context():
            if c.init_from and self.strategy.zero_stage == 3 and is_convllava_checkpoint(c.init_from):
                return self.strategy.build_partitioned(c.init_from, attn)
            if c.init_from:
                return load_model(c.init_from, attn_implementation=attn)
            model_config = ConvLlavaConfig.from_preset(c.preset, **({"attn_implementation": attn} if attn else {}))
            # The saved processor tokenizes prompts the way the shards were tokenized (one_pass or llava).
            tokenization = self.shards.manifest["config"].get("tokenization", "one_pass")
            # `_from_config` is the constructor transformers' ZeRO-3 integration hooks into (the same weights as
            # `ConvLlavaForCausalLM(config)` for the same seed otherwise).
            return (
                ConvLlavaForCausalLM._from_config(model_config),
                ConvLlavaProcessor.for_model(model_config, c.tokenizer, tokenization=tokenization),
            )

    def _check_data_matches_model(self, model: ConvLlavaForCausalLM) -> None:
        made_with = self.shards.manifest["config"]
        if made_with.get("template") != model.config.template:
            raise ValueError(
                f"{self.config.data}: shards were tokenized with template {made_with.get('template')!r} but the "
                f"model uses {model.config.template!r}; preprocess again with --template {model.config.template}"
            )
        made = made_with.get("tokenization", "one_pass")
        if made != self.processor.config.tokenization:
            raise ValueError(
                f"{self.config.data}: shards were tokenized with tokenization {made!r} but the model's processor uses "
                f"{self.processor.config.tokenization!r}; preprocess again with "
                f"tokenization: {self.processor.config.tokenization}"
            )

    def _param_groups(self, model: ConvLlavaForCausalLM) -> list[dict[str, Any]]:
        params = dict(model.named_parameters())
        assigned: set[str] = set()
        groups = []
        for name, lr in self.config.lr_groups.items():
            members = [n for n in param_group(model, name) if params[n].requires_grad and n not in assigned]
            assigned.update(members)
            groups.append({"params": [params[n] for n in members], "lr": lr, "name": name})
        rest = [p for n, p in params.items() if p.requires_grad and n not in assigned]
        return [{"params": rest, "lr": self.config.lr, "name": "default"}, *[g for g in groups if g["params"]]]

    def _plan(self, epoch: int):
        c = self.config
        return plan_epoch(self.shards.infos, micro_batch_size=c.micro_batch_size, grad_accum=c.grad_accum,
                          world_size=self.world_size, seed=c.seed, epoch=epoch, group_by_length=c.group_by_length)  # fmt: skip

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, float]:
        c = self.config
        metrics: dict[str, float] = {}
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            plan = self._plan(epoch)
            start = time.perf_counter()
            totals = [0.0] * 5  # loss·n, micro-batches, tokens, visual tokens, padding
            for micro in plan.micro_batches(self.rank, index):
                batch = collate(self.shards.rows(micro), self.processor.tokenizer.pad_token_id)
                out = self.engine(input_ids=batch["input_ids"].to(self.device),
                                  attention_mask=batch["attention_mask"].to(self.device),
                                  labels=batch["labels"].to(self.device),
                                  pixel_values=None if batch["pixel_values"] is None
                                  else batch["pixel_values"].to(self.device))  # fmt: skip
                # A text-only micro-batch still runs tower and projector (on a blank image, weighted zero; see
                # ConvLlavaForCausalLM.embed_inputs), so every rank joins the same collectives.
                self.engine.backward(out.loss)
                self.engine.step()
                stats = batch["stats"]
                values = (out.loss.item(), 1, stats["num_tokens"], stats["num_visual_tokens"],
                          stats["text_padding_fraction"])  # fmt: skip
                totals = [t + v for t, v in zip(totals, values, strict=True)]
            self.step += 1
            totals = self.collectives.sum(totals)
            (peak,) = self.collectives.max([peak_memory_bytes(self.device) / 2**30])
            elapsed = time.perf_counter() - start
            metrics = {
                "train/loss": totals[0] / totals[1],
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/samples_per_s": c.global_batch_size / elapsed,
                "train/tokens_per_s": totals[2] / elapsed,
                "train/visual_tokens_per_s": totals[3] / elapsed,
                "train/text_padding_fraction": totals[4] / totals[1],
                "train/peak_memory_gib": peak,
                "train/step_time_s": elapsed,
                "train/epoch": epoch + (index + 1) / self.steps_per_epoch,
            }
            if self.logger and (self.step % c.log_every == 0 or self.step == self.total_steps):
                self.logger.log(self.step, metrics)
            if self.logger and self.step == self.total_steps:
                self.logger.close()  # bounded wait for buffered metrics; what stays unsent goes into the checkpoint
            if self.step == self.total_steps or (c.checkpoint_every and self.step % c.checkpoint_every == 0):
                self.save_checkpoint(metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Write DeepSpeed state + consolidated HF model + trainer state and the completion marker, then publish."""
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.config.name}-{self.step}-"))
        self.strategy.save(self.engine, tmp / "deepspeed")
        state = self.strategy.full_state_dict(self.engine)  # collective under ZeRO-3
        rng = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
               "numpy": _jsonable(np.random.get_state()), "python": _jsonable(random.getstate())}  # fmt: skip
        (tmp / "rng").mkdir()
        (tmp / "rng" / f"rank{self.rank}.json").write_text(json.dumps(rng))
        if self.rank == 0:
            model = self.engine.module
            model.save_pretrained(str(tmp / "model"), state_dict=state, safe_serialization=True)
            self.processor.save_pretrained(tmp / "model")
            (tmp / "model" / "stage_config.yaml").write_text(self.config.to_yaml())
            trainer_state = {"step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                             "world_size": self.world_size, "data_fingerprint": self.shards.fingerprint,
                             "config_hash": self.config.config_hash(), "run_id": self.run_id,
                             "metrics": metrics,  # and what MLflow has not stored yet: a restart or the driver sends it
                             "unlogged_metrics": self.logger.unsent() if self.logger else []}  # fmt: skip
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        write_completion_marker(tmp, self.rank)
        self.collectives.barrier()
        try:
            self.checkpoints.publish(tmp, self.step, metrics)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _restore(self, directory: Path) -> None:
        verify_checkpoint(directory, self.world_size)
        state = json.loads((directory / TRAINER_STATE).read_text())
        if state["data_fingerprint"] != self.shards.fingerprint:
            raise ValueError(f"checkpoint {directory} was trained on other data ({state['data_fingerprint']})")
        if state["config_hash"] != self.config.config_hash():
            raise ValueError(
                f"checkpoint {directory} belongs to a run started with another stage config "
                f"({state['config_hash']} ≠ {self.config.config_hash()}); use another --run-name or storage"
            )
        self.strategy.load(self.engine, directory / "deepspeed")
        self.step = state["step"]
        self.unsent_metrics = state.get("unlogged_metrics", [])
        rng = json.loads((directory / "rng" / f"rank{self.rank}.json").read_text())
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(rng["torch"]), dtype=np.uint8).copy()))
        np.random.set_state(_from_jsonable(rng["numpy"]))
        random.setstate(_from_jsonable(rng["python"]))
        if self.rank == 0:
            print(f"[{self.config.name}] resumed at step {self.step}/{self.total_steps} from {directory}", flush=True)


class DeviceCollectives:
    """Every collective the recipe itself issues, on one device: the engine's. NCCL (`use_gpu: true`) refuses CPU
    tensors, gloo refuses CUDA ones, so a tensor on another device is refused here, naming both, before it reaches
    the process group.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def _check(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            raise RuntimeError(f"collective on a tensor on {tensor.device}; the engine computes on {self.device}")
        return tensor

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(self._check(tensor))
        return tensor.tolist()

    def max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(self._check(tensor), op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(
                device_ids=[self.device.index if self.device.index is not None else torch.cuda.current_device()]
            )
        else:
            dist.barrier()


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA memory allocated on a GPU, the resident set's high-water mark (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


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
    stored = {info.path[len(root) + 1 :]: info.size for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if info.type == pafs.FileType.File}  # fmt: skip

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

"""The stage recipe: one class, one lifecycle (setup → train → save_checkpoint), all three stages.

It runs inside every Ray Train worker. A stage is only configuration: trainable groups, learning rates, data,
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from convllava.checkpoint import load_model
from convllava.config import ConvLlavaConfig
from convllava.data import collate, plan_epoch
from convllava.modeling import ConvLlavaForCausalLM
from convllava.processor import ConvLlavaProcessor
from convllava.trainable import format_table, param_group, set_trainable, trainable_table
from jobs.shards import ShardSet
from jobs.stage_config import StageConfig
from jobs.strategy import DeepSpeedStrategy
from jobs.tracking import MetricLogger

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


class StageRecipe:
    def __init__(self, config: StageConfig, run: dict[str, Any], rank: int, world_size: int) -> None:
        self.config, self.run, self.rank, self.world_size = config, run, rank, world_size
        self.step, self.logger = 0, None
        self.unsent_metrics: list[list] = []  # [key, value, timestamp, step] rows MLflow has not stored yet

    # ------------------------------------------------------------------ setup
    def setup(self, checkpoint_dir: Path | None) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.shards = ShardSet(c.data)
        if c.init_from:
            model, processor = load_model(c.init_from, attn_implementation=c.attn_implementation)
        else:
            kwargs = {"attn_implementation": c.attn_implementation} if c.attn_implementation else {}
            model_config = ConvLlavaConfig.from_preset(c.preset, **kwargs)
            # The saved processor tokenizes prompts the way the shards were tokenized (one_pass or llava).
            tokenization = self.shards.manifest["config"].get("tokenization", "one_pass")
            model, processor = (
                ConvLlavaForCausalLM(model_config),
                ConvLlavaProcessor.for_model(model_config, c.tokenizer, tokenization=tokenization),
            )
        self.processor = processor
        self._check_data_matches_model(model)
        model.train()  # `load_model` returns an inference-mode model; training needs dropout and drop-path back
        set_trainable(model, c.trainable)
        if c.gradient_checkpointing:
            model.activation_checkpointing_enable()
        self.table = format_table(trainable_table(model))
        if self.rank == 0:
            print(f"[{c.name}] trainable parameters:\n{self.table}", flush=True)

        self.steps_per_epoch = self._plan(0).num_steps
        self.total_steps = c.epochs * self.steps_per_epoch
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        self.strategy = DeepSpeedStrategy(c, self.world_size)
        optimizer = torch.optim.AdamW(self._param_groups(model), lr=c.lr, weight_decay=c.weight_decay)
        schedule = lr_lambda(self.total_steps, c.warmup_ratio, c.schedule)
        self.engine, self.scheduler = self.strategy.setup(
            model, optimizer, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        )
        if checkpoint_dir is not None:
            self._restore(checkpoint_dir)
        if self.rank == 0 and self.run.get("tracking_uri") and self.run.get("run_id"):
            self.logger = MetricLogger(self.run["tracking_uri"], self.run["run_id"])
            self.logger.requeue(self.unsent_metrics)  # metrics the checkpoint's run could not send before it stopped
            if self.step == 0:
                from jobs.tracking import client, retry_call

                retry_call("log trainable_parameters.txt", lambda: client(self.run["tracking_uri"]).log_text(
                    self.run["run_id"], self.table, "trainable_parameters.txt"), attempts=1)  # fmt: skip

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
            totals = torch.zeros(5, dtype=torch.float64)  # loss·n, micro-batches, tokens, visual tokens, padding
            for micro in plan.micro_batches(self.rank, index):
                batch = collate(self.shards.rows(micro), self.processor.tokenizer.pad_token_id)
                out = self.engine(input_ids=batch["input_ids"].to(self.engine.device),
                                  attention_mask=batch["attention_mask"].to(self.engine.device),
                                  labels=batch["labels"].to(self.engine.device),
                                  pixel_values=None if batch["pixel_values"] is None
                                  else batch["pixel_values"].to(self.engine.device))  # fmt: skip
                # A text-only micro-batch still runs tower and projector (on a blank image, weighted zero; see
                # ConvLlavaForCausalLM.embed_inputs), so every rank joins the same collectives.
                self.engine.backward(out.loss)
                self.engine.step()
                stats = batch["stats"]
                totals += torch.tensor([out.loss.item(), 1, stats["num_tokens"], stats["num_visual_tokens"],
                                        stats["text_padding_fraction"]], dtype=torch.float64)  # fmt: skip
            self.step += 1
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - start
            metrics = {
                "train/loss": totals[0].item() / totals[1].item(),
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                "train/samples_per_s": c.global_batch_size / elapsed,
                "train/tokens_per_s": totals[2].item() / elapsed,
                "train/visual_tokens_per_s": totals[3].item() / elapsed,
                "train/text_padding_fraction": totals[4].item() / totals[1].item(),
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
        """Write DeepSpeed state + consolidated HF model + trainer state, verify, then report to Ray Train."""
        import ray.train

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
                             "config_hash": self.config.config_hash(), "run_id": self.run.get("run_id"),
                             "metrics": metrics,  # and what MLflow has not stored yet: a restart or the driver sends it
                             "unlogged_metrics": self.logger.unsent() if self.logger else []}  # fmt: skip
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        write_completion_marker(tmp, self.rank)
        dist.barrier()
        checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
        try:
            ray.train.report({**metrics, "step": self.step}, checkpoint=checkpoint,
                             checkpoint_dir_name=f"checkpoint_{self.step:06d}",
                             checkpoint_upload_fn=upload_checkpoint)  # fmt: skip
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


def upload_checkpoint(checkpoint, checkpoint_dir_name: str):
    """Ray Train's own upload of this rank's part of a checkpoint, then a check that every file arrived whole.

    pyarrow's `copy_files` (what Ray uploads with) ignores the error of a file whose S3 upload failed after all
    retries ("Error ignored when destroying file"): the file is silently missing, and Ray would record the checkpoint
    as complete. Raising here fails the report instead, so the checkpoint is never recorded.

    Raises:
        CheckpointIncomplete: naming the files missing or short in storage.
    """
    import pyarrow.fs as pafs
    import ray.train

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    root = persisted.path.rstrip("/")
    stored = {info.path[len(root) + 1 :]: info.size
              for info in persisted.filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
              if info.type == pafs.FileType.File}  # fmt: skip
    local = Path(checkpoint.path)
    written = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    lost = sorted(rel for rel, size in written.items() if stored.get(rel) != size)
    if lost:
        raise CheckpointIncomplete(f"{checkpoint_dir_name}: uploading to {persisted.path} lost {lost}; not recorded")
    return persisted


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
    if not (directory / "model" / "model.safetensors").is_file() or not (directory / TRAINER_STATE).is_file():
        raise CheckpointIncomplete(f"{directory}: no consolidated model or trainer state")
    return json.loads((directory / TRAINER_STATE).read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

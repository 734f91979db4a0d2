"""The stage recipe: one class, one lifecycle (setup → train → save_checkpoint), all three stages.

It runs in every training process: a Ray Train worker (`jobs.train.driver`) or a plain process, alone or under `torchrun`
(`jobs.train.local`). Where checkpoints go and where metrics go are the caller's (`CheckpointSink`, `MetricSink`); the
recipe imports neither Ray nor MLflow. A stage is only configuration: trainable groups, learning rates, data,
schedule, DeepSpeed JSON. Resumption is exact: a checkpoint holds DeepSpeed's state, the step counter, every
rank's RNG state and the data position (a step index into the seeded epoch plan), so a restarted run replays
nothing and skips nothing. The checkpoint's layout and its verification are `jobs.train.checkpoints`'.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from convllava.data.epochs import collate
from convllava.data.loader import RankLoader
from convllava.data.preprocess_config import PreprocessConfig
from convllava.data.shards import ShardSet
from convllava.io.storage import resolve_local
from convllava.modeling.attention import attention_unavailable, resolve_attn_implementation
from convllava.modeling.checkpoint import is_convllava_checkpoint, load_model
from convllava.modeling.config import ConvLlavaConfig
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.trainable import format_table, param_group, set_trainable, trainable_table
from convllava.processing.processor import ConvLlavaProcessor
from convllava.processing.processor_config import ProcessorConfig
from jobs.tracking import vocabulary as names
from jobs.train.checkpoints import (
    TRAINER_STATE,
    StoredCheckpoint,
    reseed,
    restore_rng_state,
    rng_state,
    write_completion_marker,
)
from jobs.train.config import StageConfig
from jobs.train.device import DeviceCollectives, peak_memory_bytes
from jobs.train.epochs import stage_plan
from jobs.train.interfaces import CheckpointSink, MetricSink
from jobs.train.states import StateSource, load_state, save_state
from jobs.train.strategy import DeepSpeedStrategy

# A folder: every rank appends, per step, the keys of the samples it trains (`STAGE.rankR.jsonl`): an audit of which
# samples each step trained, across restarts and resizes (a step a restart redid appears again; its last line holds).
LEDGER_ENV = "CONVLLAVA_SAMPLE_LEDGER"


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """The learning-rate factor per step: linear warmup over `warmup_ratio` of the steps, then constant or cosine."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def startup_metrics(marks: list[tuple[str, float]]) -> dict[str, float]:
    """`startup/<phase>_s` for each phase from the marks (label, wall-clock time) in order, the first being the start
    (the call), each label naming the phase that ends at its time; and `startup/total_s`, the call to the last mark.

    A stage launched by Ray Train passes `called` (run_stage's call), `driver` (config, storage check, tracking, memory
    plan: the trainer starts), `worker_start` (Ray Train's controller and worker group: this worker process exists),
    `worker_init` (imports, process group: the train loop runs); the recipe adds `model`, `engine` (DeepSpeed's
    initialize), `restore` (a checkpoint's state, when resuming) and `first_step` (the first optimizer step is done).
    """
    out = {names.startup_metric(label): t - prev for (_, prev), (label, t) in itertools.pairwise(marks)}
    out[names.startup_metric("total")] = marks[-1][1] - marks[0][1]
    return out


class StageRecipe:
    """One training stage in one process of `world_size`: builds the model the ZeRO stage needs, restores a
    checkpoint exactly, trains to `total_steps`, and hands checkpoints and metrics to the sinks it was given.

    Args:
        checkpoints: where checkpoints go (every rank).
        metrics: where rank 0's metrics go (None: not recorded; other ranks always None).
        run_id: the tracking run a checkpoint records it belongs to.
        startup: the start-up marks before this recipe (`startup_metrics`); default: its construction is the start.
            Rank 0 logs the breakdown with the first step it logs.
        node: the machine this process runs on (Ray's node id), for the sample ledger.
    """

    def __init__(
        self,
        config: StageConfig,
        rank: int,
        world_size: int,
        *,
        checkpoints: CheckpointSink,
        metrics: MetricSink | None = None,
        run_id: str | None = None,
        device: torch.device | str | None = None,
        startup: list[tuple[str, float]] | None = None,
        node: str | None = None,
    ) -> None:
        self.config, self.rank, self.world_size, self.node = config, rank, world_size, node
        self.checkpoints, self.logger, self.run_id = checkpoints, metrics if rank == 0 else None, run_id
        # The device this worker computes on (Ray Train's `get_device()`); the engine's device once it exists.
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.step = 0
        self.unsent_metrics: list[list] = []  # [key, value, timestamp, step] rows the metric sink has not stored
        self.marks = list(startup or [("called", time.time())])
        self.startup_logged = False
        self.loader_steps = None  # the current epoch's RankLoader iteration
        self.resized_from: int | None = None  # the world size of the checkpoint resumed, when it differs
        self.resumed_step = 0
        ledger = os.environ.get(LEDGER_ENV)
        self.ledger = Path(ledger) if ledger else None
        if self.ledger is not None:
            self.ledger.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ setup
    def setup(self, checkpoint: StoredCheckpoint | Path | None) -> None:
        """Build the model and engine; with `checkpoint` (a folder, or a checkpoint in its storage), resume it."""
        c = self.config
        torch.manual_seed(c.seed)
        self.shards = ShardSet(c.data)
        self.strategy = DeepSpeedStrategy(c, self.world_size)
        model, self.processor = self.build_model()
        self.marks.append(("model", time.time()))
        check_shards_match_processor(c.data, self.shards.manifest.config, self.processor.config)
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
        self.marks.append(("engine", time.time()))
        if checkpoint is not None:
            self._restore(checkpoint if isinstance(checkpoint, StoredCheckpoint) else StoredCheckpoint(checkpoint))
            self.marks.append(("restore", time.time()))
        self.resumed_step = self.step
        if self.logger is not None:
            self.logger.requeue(self.unsent_metrics)  # metrics the checkpoint's run could not send before it stopped
            if self.resized_from is not None:  # an elastic stage resumed at another size: one event per resize
                self.logger.rewind(self.step)  # steps the lost group logged after this checkpoint are trained again
                self.logger.set_tag(names.resize_tag(self.step), f"{self.resized_from} -> {self.world_size} workers")
            if self.step == 0:
                self.logger.log_text(self.table, names.ARTIFACT_TRAINABLE)

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
            print(
                f"[{c.name}] attention: {attn} ({requested} requested: {attention_unavailable(requested, self.device)})",
                flush=True,
            )
        with self.strategy.model_context():
            if c.init_from and self.strategy.zero_stage == 3 and is_convllava_checkpoint(c.init_from):
                return self.strategy.build_partitioned(c.init_from, attn)
            if c.init_from:
                return load_model(c.init_from, attn_implementation=attn)
            model_config = ConvLlavaConfig.from_preset(c.preset, **({"attn_implementation": attn} if attn else {}))
            # The saved processor tokenizes prompts the way the shards were tokenized (one_pass or llava).
            tokenization = self.shards.manifest.config.tokenization
            # `_from_config` is the constructor transformers' ZeRO-3 integration hooks into (the same weights as
            # `ConvLlavaForCausalLM(config)` for the same seed otherwise).
            return (
                ConvLlavaForCausalLM._from_config(model_config),
                ConvLlavaProcessor.for_model(model_config, c.tokenizer, tokenization=tokenization),
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
        return stage_plan(self.shards.layout, self.config, epoch, self.world_size)

    # ------------------------------------------------------------------ train
    def train(self) -> dict[str, float]:
        """Train to total_steps from the current step; returns the last step's metrics."""
        try:
            return self._train()
        finally:
            if self.loader_steps is not None:
                self.loader_steps.close()  # stops the read-ahead threads of an epoch left before its end

    def _train(self) -> dict[str, float]:
        c = self.config
        metrics: dict[str, float] = {}
        loader = None
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            if loader is None or loader.plan.epoch != epoch:  # the epoch's reads, from the step a resume starts at
                if self.loader_steps is not None:
                    self.loader_steps.close()
                loader = RankLoader(self.shards, self._plan(epoch), self.rank, index, prefetch=c.prefetch)
                self.loader_steps = iter(loader)
            start = time.perf_counter()
            totals = [0.0] * 5  # loss·n, micro-batches, tokens, visual tokens, padding
            planned, micro_rows = next(self.loader_steps, (None, None))
            if planned != index:
                raise RuntimeError(
                    f"internal error: epoch {epoch}'s loader gave step {planned} for step {index} of "
                    f"{self.steps_per_epoch}"
                )
            if self.ledger is not None:
                self._record(epoch, micro_rows)
            for rows in micro_rows:
                batch = collate(rows, self.processor.tokenizer.pad_token_id)
                out = self.engine(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    labels=batch["labels"].to(self.device),
                    pixel_values=None if batch["pixel_values"] is None else batch["pixel_values"].to(self.device),
                )
                # A text-only micro-batch still runs tower and projector (on a blank image, weighted zero; see
                # ConvLlavaForCausalLM.embed_inputs), so every rank joins the same collectives.
                self.engine.backward(out.loss)
                self.engine.step()
                stats = batch["stats"]
                values = (
                    out.loss.item(),
                    1,
                    stats["num_tokens"],
                    stats["num_visual_tokens"],
                    stats["text_padding_fraction"],
                )
                totals = [t + v for t, v in zip(totals, values, strict=True)]
            self.step += 1
            totals = self.collectives.sum(totals)
            (peak,) = self.collectives.max([peak_memory_bytes(self.device) / 2**30])
            elapsed = time.perf_counter() - start
            metrics = {
                names.TRAIN_LOSS: totals[0] / totals[1],
                names.TRAIN_LR: self.scheduler.get_last_lr()[0],
                names.TRAIN_GRAD_NORM: float(self.engine.get_global_grad_norm() or 0.0),
                names.TRAIN_SAMPLES_PER_S: c.global_batch_size / elapsed,
                names.TRAIN_TOKENS_PER_S: totals[2] / elapsed,
                names.TRAIN_VISUAL_TOKENS_PER_S: totals[3] / elapsed,
                names.TRAIN_TEXT_PADDING_FRACTION: totals[4] / totals[1],
                names.TRAIN_PEAK_MEMORY_GIB: peak,
                names.TRAIN_STEP_TIME_S: elapsed,
                names.TRAIN_EPOCH: epoch + (index + 1) / self.steps_per_epoch,
                names.TRAIN_WORLD_SIZE: self.world_size,
            }
            if self.marks[-1][0] != "first_step":  # this process's first step
                self.marks.append(("first_step", time.time()))
            if self.logger and (self.step % c.log_every == 0 or self.step == self.total_steps):
                if not self.startup_logged:  # with the first step this process logs
                    metrics = {**metrics, **startup_metrics(self.marks)}
                    self.startup_logged = True
                self.logger.log(self.step, metrics)
            if self.logger and self.step == self.total_steps:
                self.logger.close()  # bounded wait for buffered metrics; what stays unsent goes into the checkpoint
            if self.step == self.total_steps or (c.checkpoint_every and self.step % c.checkpoint_every == 0):
                self.save_checkpoint(metrics)
        return metrics

    def _record(self, epoch: int, micro_rows) -> None:
        """One line of the sample ledger: the samples this rank trains at the coming step (see `LEDGER_ENV`)."""
        keys = [row["key"] for rows in micro_rows for row in rows]
        line = {
            "stage": self.config.name,
            "step": self.step + 1,
            "epoch": epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "resumed_from": self.resumed_step,
            "node": self.node,
            "time": time.time(),
            "keys": keys,
        }
        with open(self.ledger / f"{self.config.name}.rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Write DeepSpeed state + consolidated HF model + trainer state and the completion marker, then publish."""
        tmp = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.config.name}-{self.step}-"))
        save_state(self.engine, self.scheduler, tmp, self.rank)  # any world size can restore it; no pickle
        state = self.strategy.full_state_dict(self.engine)  # collective under ZeRO-3
        rng = rng_state()
        (tmp / "rng").mkdir()
        (tmp / "rng" / f"rank{self.rank}.json").write_text(json.dumps(rng))
        if self.rank == 0:
            model = self.engine.module
            model.save_pretrained(str(tmp / "model"), state_dict=state, safe_serialization=True)
            self.processor.save_pretrained(tmp / "model")
            (tmp / "model" / "stage_config.yaml").write_text(self.config.to_yaml())
            trainer_state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.world_size,
                "data_fingerprint": self.shards.fingerprint,
                "config_hash": self.config.config_hash(),
                "run_id": self.run_id,
                "metrics": metrics,  # and what MLflow has not stored yet: a restart or the driver sends it
                "unlogged_metrics": self.logger.unsent() if self.logger else [],
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        write_completion_marker(tmp, self.rank)
        self.collectives.barrier()
        try:
            self.checkpoints.publish(tmp, self.step, metrics)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _restore(self, checkpoint: StoredCheckpoint) -> None:
        """The checkpoint's step, data position, trainer state and DeepSpeed state, at this world size whatever the
        size that wrote it (`jobs.train.states`: byte ranges of safetensors files, each checked against its digest;
        nothing is unpickled). RNG states come back exactly when the size is the same; otherwise every rank reseeds
        from (seed, step, rank)."""
        state = checkpoint.json(TRAINER_STATE)
        if state["data_fingerprint"] != self.shards.fingerprint:
            raise ValueError(f"checkpoint {checkpoint.where} was trained on other data ({state['data_fingerprint']})")
        if state["config_hash"] != self.config.config_hash():
            raise ValueError(
                f"checkpoint {checkpoint.where} belongs to a run started with another stage config "
                f"({state['config_hash']} ≠ {self.config.config_hash()}); use another --run-name or storage"
            )
        saved_world = int(state.get("world_size", self.world_size))
        if saved_world != self.world_size and not self.config.elastic:
            raise ValueError(
                f"checkpoint {checkpoint.where} was written by {saved_world} workers and this run has "
                f"{self.world_size}: the epoch's batches are dealt per worker; make the stage elastic "
                f"(workers=[MIN, MAX]) to change its size mid-stage"
            )
        load_state(self.engine, self.scheduler, StateSource(checkpoint.root, checkpoint.fs))
        self.step = state["step"]
        self.resized_from = saved_world if saved_world != self.world_size else None
        self.unsent_metrics = state.get("unlogged_metrics", [])
        if saved_world == self.world_size:
            restore_rng_state(checkpoint.json(f"rng/rank{self.rank}.json"))
        else:
            reseed(self.config.seed, self.step, self.rank)
        if self.rank == 0:
            size = f" (written by {saved_world} workers, now {self.world_size})" if self.resized_from else ""
            print(
                f"[{self.config.name}] resumed at step {self.step}/{self.total_steps} from {checkpoint.where}{size}",
                flush=True,
            )


def check_shards_match_processor(data: str, made_with: PreprocessConfig, processor: ProcessorConfig) -> None:
    """Refuse shards the model's processor would not have made: another resolution or image mode (other pixels,
    other visual token counts), template or tokenization (other token ids and labels). Each mismatch is named, with
    the preprocess setting that fixes it. (A manifest from before `tokenization` existed reads as `one_pass`.)"""
    wanted = {
        "resolution": processor.image.resolution,
        "mode": processor.image.mode,
        "template": processor.template,
        "tokenization": processor.tokenization,
    }
    made = {k: getattr(made_with, k) for k in wanted}
    wrong = {k: v for k, v in wanted.items() if made.get(k) != v}
    if wrong:
        found = "; ".join(f"{k} {made.get(k)!r} (the model's processor: {v!r})" for k, v in wrong.items())
        fix = ", ".join(f"{k}: {v}" for k, v in wrong.items())
        raise ValueError(
            f"{data}: the shards were made with {found}; preprocess again with {fix}, or train a model whose processor "
            f"matches them"
        )

"""The stage configuration: one config for all three stages; stages differ only in values.

Flow: YAML (`jobs/configs/...`) → `StageConfig` → `key=value` CLI overrides → validated, frozen. The resolved
config is logged to MLflow and written into every checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from convllava.io.config import ConfigLoadError, ConfigModel

CONFIG_DIR = Path(__file__).parents[1] / "configs"
Stage = Literal[1, 2, 3]
STAGES: tuple[int, ...] = get_args(Stage)
Schedule = Literal["cosine", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


class StageConfig(ConfigModel):
    """Args:
    name: stage name, e.g. `stage1`; names the Ray Train run and the MLflow run.
    data: preprocessed shards (local folder or `s3://`), the output of `convllava preprocess`.
    init_from: checkpoint to start from (local or `s3://`); None builds `preset` from scratch.
    preset / tokenizer: used when `init_from` is None.
    trainable: groups of `convllava.modeling.trainable` that train; the rest is frozen.
    lr: learning rate; `lr_groups` sets other rates for some of the trainable groups.
    global_batch_size / micro_batch_size: gradient accumulation = global / (micro × workers), exactly (for an elastic
        stage, at every size it may run at: the global batch never changes, the accumulation adapts).
    epochs / max_steps: one epoch in the paper; max_steps caps the optimizer steps (tests, smoke runs).
    warmup_ratio / schedule / weight_decay / max_grad_norm: AdamW with warmup then cosine decay.
    deepspeed: a JSON under jobs/configs/deepspeed/ (zero2, zero3, zero3_offload) or a path.
    workers / use_gpu: Ray Train scaling. CPU: gloo + fp32. GPU: nccl + bf16. `workers: [MIN, MAX]` makes the stage
        elastic: it runs on as many workers as the cluster has, MIN to MAX, goes on from its last checkpoint with
        fewer when a node is lost and grows back when capacity returns (the state is resharded; see
        `jobs.train.states`). Its epoch is planned in global-batch order, the same whatever the size.
    resize_check_s: how often a running elastic stage below MAX looks for capacity to grow back (a resize restarts
        the workers from the last checkpoint: the steps since it are done again).
    group_by_length: micro-batches of similar lengths (less padding) inside each shuffle window.
    shuffle_window / prefetch: a rank shuffles its share of the data `shuffle_window` row groups at a time and reads
        `prefetch` row groups ahead of the step (`convllava.data.epochs.plan_shard_epoch`, `convllava.data.loader.RankLoader`);
        memory per rank ≈ (shuffle_window + prefetch) row groups (≤ 32 MB of images each by default).
    checkpoint_every / keep_last: checkpoint every N optimizer steps (and at the end); keep the last K.
    max_failures: worker failures Ray Train recovers from, resuming from the latest checkpoint.
    """

    name: str
    data: str
    trainable: tuple[str, ...]
    lr: float
    global_batch_size: int
    micro_batch_size: int
    stage: Stage = 1
    init_from: str | None = None
    preset: str | None = None
    tokenizer: str = "tiny"
    lr_groups: dict[str, float] = Field(default_factory=dict)
    epochs: int = 1
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    schedule: Schedule = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    deepspeed: str = "zero2"
    workers: int | tuple[int, int] = 2
    resize_check_s: float = 60.0
    use_gpu: bool = False
    gradient_checkpointing: bool = True
    attn_implementation: str | None = None
    group_by_length: bool = True
    shuffle_window: int = 16
    prefetch: int = 4
    checkpoint_every: int = 0
    keep_last: int = 2
    max_failures: int = 2
    log_every: int = 1
    seed: int = 0

    @field_validator("workers", mode="before")
    @classmethod
    def _workers_shape(cls, value: Any) -> Any:
        """A number or [MIN, MAX] (checked here: pydantic would name both arms of the union)."""
        if isinstance(value, list | tuple):
            if len(value) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
                raise ValueError(f"give a number or [MIN, MAX] with 1 <= MIN <= MAX, got {list(value)}")
            return tuple(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"stage config {self.name!r}: {name}: {why}")

        if self.elastic and not 1 <= self.workers[0] <= self.workers[1]:
            fail("workers", f"give a number or [MIN, MAX] with 1 <= MIN <= MAX, got {list(self.workers)}")
        if not self.trainable:
            fail("trainable", "name at least one group")
        for key in self.lr_groups:
            if key not in self.trainable:
                fail("lr_groups", f"{key!r} is not one of the trainable groups {list(self.trainable)}")
        for name in (
            "lr",
            "global_batch_size",
            "micro_batch_size",
            "epochs",
            "workers",
            "keep_last",
            "log_every",
            "shuffle_window",
            "prefetch",
        ):
            value = self.min_workers if name == "workers" else getattr(self, name)
            if not value > 0:
                fail(name, f"must be > 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            fail("max_steps", f"must be >= 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.resize_check_s <= 0:
            fail("resize_check_s", f"must be > 0, got {self.resize_check_s}")
        if self.checkpoint_every < 0 or self.max_failures < 0:
            fail("checkpoint_every/max_failures", "must be >= 0")
        if not self.elastic:
            per_step = self.micro_batch_size * self.workers
            if self.global_batch_size % per_step:
                fail(
                    "global_batch_size",
                    f"{self.global_batch_size} is not a multiple of micro_batch_size × workers = {per_step}; "
                    "gradient accumulation must be a whole number",
                )
        sizes = range(self.min_workers, self.max_workers + 1)
        bad = [n for n in sizes if self.global_batch_size % (self.micro_batch_size * n)]
        if self.elastic and bad:
            lcm = math.lcm(*sizes) * self.micro_batch_size
            fail(
                "global_batch_size",
                f"{self.global_batch_size} samples cannot be split into whole micro-batches of {self.micro_batch_size} "
                f"per worker at {bad} workers, sizes this elastic stage (workers={list(self.workers)}) may run at; "
                f"the global batch stays the same at every size, so it must be a multiple of {lcm} "
                f"(micro_batch_size × the least common multiple of {self.min_workers}..{self.max_workers})",
            )
        self.deepspeed_config()  # fail early on a missing file
        return self

    def check_runnable(self) -> None:
        """What a run needs beyond a valid file: a starting point (stage 2/3 YAMLs get it from the pipeline)."""
        if self.init_from is None and self.preset is None:
            raise ConfigLoadError(
                f"stage config {self.name!r}: init_from: give a checkpoint (--init-from, or the previous stage's "
                "in a pipeline) or a preset to start from scratch"
            )

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def grad_accum(self) -> int:
        """Gradient accumulation at `max_workers` (the most an elastic stage runs at)."""
        return self.accum_at(self.max_workers)

    def accum_at(self, world_size: int) -> int:
        """Gradient accumulation at `world_size` workers: the global batch stays the same."""
        return self.global_batch_size // (self.micro_batch_size * world_size)

    def deepspeed_config(self) -> dict[str, Any]:
        path = Path(self.deepspeed)
        if not path.suffix:
            path = CONFIG_DIR / "deepspeed" / f"{self.deepspeed}.json"
        if not path.is_file():
            raise ConfigLoadError(f"stage config {self.name!r}: deepspeed: {path} not found")
        return json.loads(path.read_text())

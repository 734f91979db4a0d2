"""A stage's epoch plan at a world size: what every rank trains at every step.

A fixed-size stage plans for its workers: each rank walks its own contiguous share of the shard files
(`plan_shard_epoch`). An elastic stage (`workers: [MIN, MAX]`) plans for S streams, S the least common multiple of
MIN..MAX, and deals each step's micro-batches to the ranks it has (`EpochPlan.for_world`): every step trains the
same samples at any size, so a stage that loses a node or gains one mid-epoch neither repeats a sample nor skips
one, and each rank still reads whole shares (S / world size of them) row group by row group.
"""

from __future__ import annotations

import math

from convllava.data.epochs import EpochPlan, ShardLayout, plan_shard_epoch
from jobs.train.config import StageConfig


def streams(config: StageConfig, world_size: int) -> int:
    """How many per-rank shares the epoch is planned in."""
    return math.lcm(*range(config.min_workers, config.max_workers + 1)) if config.elastic else world_size


def stage_plan(layout: ShardLayout, config: StageConfig, epoch: int, world_size: int) -> EpochPlan:
    """Epoch `epoch` of the stage as `world_size` ranks train it.

    Raises:
        ValueError: too little data for one global step, or a world size the stage does not allow.
    """
    if not config.min_workers <= world_size <= config.max_workers:
        raise ValueError(f"stage {config.name}: {world_size} workers, outside workers={config.workers}")
    n = streams(config, world_size)
    plan = plan_shard_epoch(
        layout,
        micro_batch_size=config.micro_batch_size,
        grad_accum=config.global_batch_size // (config.micro_batch_size * n),
        world_size=n,
        seed=config.seed,
        epoch=epoch,
        window=config.shuffle_window,
        group_by_length=config.group_by_length,
    )
    return plan if n == world_size else plan.for_world(world_size)

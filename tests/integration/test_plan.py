"""`convllava plan`: model states against DeepSpeed's own estimators, activations against real CPU runs of the tiny
and a mid-size model, the CLI contract (table, last line, exit 0 / 3 with advice), steps per epoch from the shards,
and the pre-flight logged to MLflow."""

from __future__ import annotations

import re

import pytest
from plan_harness import plan_cli

from jobs.train.config import CONFIG_DIR, StageConfig
from jobs.train.plan import GIB, plan_stage

# A mid-size ConvLLaVA: a 6-layer, 768-wide LM with Vicuna's 32000-token vocabulary and a small five-stage tower,
# about 100M parameters (400 MB in fp32).
LAST = re.compile(r"^per-GPU peak: (\d+\.\d\d) GiB of (\d+\.\d\d) GiB$")

pytestmark = pytest.mark.integration


def test_plan_cli_on_the_demo_shards_prints_the_table_and_fits(shards):
    from convllava.data.epochs import plan_shard_epoch
    from convllava.data.shards import ShardSet

    config_path = CONFIG_DIR / "tiny" / "stage1.yaml"
    code, out = plan_cli("--config", str(config_path), "--gpu-memory", "16", f"data={shards}")
    assert code == 0, out
    lines = out.strip().splitlines()
    m = LAST.match(lines[-1])
    assert m and float(m.group(2)) == 16.0
    config = StageConfig.from_yaml(config_path, [f"data={shards}"])
    plan = plan_stage(config, gpu_memory_gib=16)
    assert float(m.group(1)) == pytest.approx(plan.peak_bytes() / GIB, abs=0.006)
    opened = ShardSet(str(shards))
    infos = opened.infos
    steps = plan_shard_epoch(  # what the stage trains by
        opened.layout, micro_batch_size=4, grad_accum=config.grad_accum, world_size=2, seed=0, epoch=0
    ).num_steps
    assert f"steps per epoch: {steps}" in lines and plan.steps_per_epoch == steps
    # The largest micro-batch: the largest image bucket at its longest sample (and the longest bucket).
    longest = {}
    for info in infos:
        longest[info.bucket] = max(longest.get(info.bucket, 0), info.length)
    worst = plan.worst[False]
    assert worst.seq_len == longest[worst.bucket] and worst.bucket in longest
    rows = {line.split()[0]: line for line in lines if line.startswith("  vision.") or line.startswith("  llm")}
    assert rows["llm"].split()[1:] == ["0", f"{plan.groups[-1][2]:,d}"]
    assert "weights" in out and "optimizer states" in out and "activations, no checkpointing" in out

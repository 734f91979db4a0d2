"""Restores a stage checkpoint in N local processes over gloo (no Ray) and writes out what the restore produced, whole:
every trainable parameter's fp32 master weights and Adam moments gathered from the ranks' partitions, the model's
weights, the step, Adam's step, the learning rates and the engine's counters. With --save, the restored state is
checkpointed again (at this world size) for the next restore.

    python tests/state_harness.py --config CONFIG_JSON --world N --checkpoint DIR --out OUT_DIR [--save SAVE_ROOT]

OUT_DIR/full.safetensors ("{name}::fp32|exp_avg|exp_avg_sq", "model::{name}") and OUT_DIR/meta.json (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from recipe_harness import join_gloo


def _rank(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    join_gloo(rank, world, port)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from jobs.train.config import StageConfig
    from jobs.train.local import LocalCheckpoints
    from jobs.train.recipe import StageRecipe

    config = StageConfig.from_dict(json.loads(Path(args.config).read_text()))
    save_root = Path(args.save) if args.save else None
    sink = LocalCheckpoints(save_root, rank, world, keep_last=10) if save_root else None
    recipe = StageRecipe(config, rank, world, checkpoints=sink)
    recipe.setup(Path(args.checkpoint))
    engine = recipe.engine
    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():  # collective under ZeRO-3: every rank, same order
        if not param.requires_grad:
            continue
        out[f"{name}::fp32"] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}::{key}"] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    model = recipe.strategy.full_state_dict(engine)
    if rank == 0:
        out.update({f"model::{k}": v.contiguous() for k, v in model.items()})
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in out.items()}, str(Path(args.out) / "full.safetensors"))
        optimizer = engine.optimizer.optimizer
        meta = {
            "step": recipe.step,
            "world_size": world,
            "adam_steps": sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s}),
            "lrs": [g["lr"] for g in optimizer.param_groups],
            "scheduler_last_epoch": recipe.scheduler.last_epoch,
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "resized_from": recipe.resized_from,
        }
        (Path(args.out) / "meta.json").write_text(json.dumps(meta))
    if sink is not None:
        recipe.save_checkpoint({})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save")
    parser.add_argument("--port", type=int, default=29741)
    args = parser.parse_args()
    mp.spawn(_rank, args=(args.world, args, args.port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

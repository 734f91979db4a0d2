"""Runs the stage recipe in N local processes over gloo, without Ray, for tests that need to look inside a worker:
which devices its collectives use, how much host memory building the model takes, whether a DeepSpeed config trains.

    python tests/recipe_harness.py --config CONFIG_JSON --world N --out OUT_DIR [--spy-collectives] [--build-only]

Each rank writes OUT_DIR/rankR.json. Checkpoints are not written (that is Ray Train's part, tested elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 2 ms: the memory a model
    copy takes, without the page cache of memory-mapped checkpoint files (which VmHWM counts and the kernel frees)."""

    def __init__(self) -> None:
        self.peak, self.baseline, self._stop = 0, _status_kib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon"))
            time.sleep(0.002)

    def stop(self) -> int:
        """Bytes above the baseline at the peak."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))
        return (self.peak - self.baseline) * 1024


def _spy(seen: list[dict]) -> None:
    """Wrap torch.distributed's collectives to record the device of every tensor they are given."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            seen.append({"op": _name, "devices": sorted({str(t.device) for t in tensors})})
            return _real(*args, **kwargs)

        setattr(dist, name, wrapper)
        import deepspeed.comm.torch as ds_torch  # DeepSpeed calls torch.distributed through its own module

        if hasattr(ds_torch.torch.distributed, name):
            setattr(ds_torch.torch.distributed, name, wrapper)


def join_gloo(rank: int, world: int, port: int) -> None:
    """This spawned process as rank `rank` of `world` over gloo, with the variables DeepSpeed reads as torchrun sets
    them; one torch thread (the ranks share the machine's cores)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rank(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    join_gloo(rank, world, port)
    from convllava.data.shards import ShardSet
    from jobs.train.config import StageConfig
    from jobs.train.recipe import StageRecipe
    from jobs.train.strategy import DeepSpeedStrategy

    config = StageConfig.from_dict(json.loads(Path(args.config).read_text()))
    recipe = StageRecipe(config, rank, world, checkpoints=None)  # checkpoints are never written here
    out: dict = {"rank": rank}
    if args.build_only:
        recipe.shards = ShardSet(config.data)
        recipe.strategy = DeepSpeedStrategy(config, world)
        # What building imports on first use (the LM's modeling code, timm, DeepSpeed's partitioning) is loaded
        # before the baseline, so the peak is the model's memory and not the libraries'.
        import deepspeed.runtime.zero.partition_parameters  # noqa: F401
        import timm  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401

        dist.barrier()
        peak = AnonPeak()
        model, _ = recipe.build_model()
        dist.barrier()
        out["build_peak_anon_bytes"] = peak.stop()
        out["local_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        out["full_param_bytes"] = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
        out["partitioned"] = all(hasattr(p, "ds_id") for p in model.parameters())
        import deepspeed

        checksum = 0.0
        for p in model.parameters():
            with deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else _null():
                checksum += float(p.detach().double().sum())
        out["checksum"] = checksum
    else:
        seen: list[dict] = []
        if args.spy_collectives:
            _spy(seen)
        StageRecipe.save_checkpoint = lambda self, metrics: None
        recipe.setup(None)
        trainable = {n: p for n, p in recipe.engine.module.named_parameters() if p.requires_grad}
        metrics = recipe.train()
        out.update(
            engine_device=str(recipe.engine.device),
            collectives=seen,
            metrics=metrics,
            step=recipe.step,
            trainable=len(trainable),
            attn_implementation=recipe.attn_implementation,
        )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=29731)
    parser.add_argument("--spy-collectives", action="store_true")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(args.world, args, args.port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()

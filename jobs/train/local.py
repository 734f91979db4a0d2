"""`convllava train --local`: the stage recipe in plain processes, without Ray or MLflow. One process, or N under
`torchrun --nproc-per-node N -m -- jobs.cli train --local ...` (the `--` keeps torchrun from reading `--local` as an
abbreviation of its own options); each process reads RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from
torchrun's environment, and the stage's `workers` becomes the world size.

Checkpoints go to STORAGE/RUN_NAME/checkpoint_NNNNNN in the layout Ray Train writes (every rank's part, its
completion marker last; `keep_last` kept), metrics to STORAGE/RUN_NAME/metrics.jsonl. Running the same command
again resumes from the latest complete checkpoint, exactly as a Ray Train rerun does.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from jobs.train.checkpoints import CheckpointIncomplete, verify_checkpoint
from jobs.train.config import StageConfig
from jobs.train.interfaces import StageResult
from jobs.train.recipe import StageRecipe

METRICS_FILE = "metrics.jsonl"


class LocalCheckpoints:
    """Checkpoints in a local (or shared network) folder: each rank copies its part into
    ROOT/checkpoint_NNNNNN, markers last, so a copy cut short never verifies; rank 0 then drops all but the newest
    `keep_last` complete ones."""

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int) -> None:
        self.root, self.rank, self.world_size, self.keep_last = root, rank, world_size, keep_last

    def publish(self, directory: Path, step: int, metrics: dict[str, float]) -> None:
        target = self.root / f"checkpoint_{step:06d}"
        # A run killed while writing this step leaves a part of it: this rank's old marker must not vouch for it.
        (target / f"COMPLETE.rank{self.rank}.json").unlink(missing_ok=True)
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name.startswith("COMPLETE")):  # markers last
            dest = target / path.relative_to(directory)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:  # every rank has written its part of the newest: keep it and the ones before it
            for old in sorted(self.root.glob("checkpoint_*"))[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, checked newest first (older ones are not read: verifying hashes every
        file, tens of GB at the paper's scale)."""
        for path in sorted(self.root.glob("checkpoint_*"), reverse=True):
            try:
                verify_checkpoint(path)  # by the ranks that wrote it: an elastic stage may have had another size
            except (CheckpointIncomplete, OSError, ValueError):
                continue
            return path
        return None


class JsonlMetrics:
    """Rank 0's metrics as one JSON line per logged step, stamped with the time it was written (`time`, Unix
    seconds); steps already in the file (a resumed run reproduces them) are not written twice, except after `rewind`
    (the last line of a step is the kept one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lines = path.read_text().splitlines() if path.is_file() else []
        self.last_step = max((json.loads(line)["step"] for line in lines if line.strip()), default=0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step <= self.last_step:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.last_step = step

    def rewind(self, step: int) -> None:
        self.last_step = min(self.last_step, step)

    def log_text(self, text: str, name: str) -> None:
        (self.path.parent / name).write_text(text)

    def set_tag(self, key: str, value: str) -> None:
        """Tags (events such as a resize) in `tags.json` beside the metrics."""
        path = self.path.parent / "tags.json"
        tags = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**tags, key: value}, indent=1))

    def unsent(self) -> list[list]:
        return []  # every line is on disk as soon as it is logged

    def requeue(self, rows: list[list]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for key, value, _, step in rows:
            by_step.setdefault(step, {})[key] = value
        for step in sorted(by_step):
            self.log(step, by_step[step])

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_process_group(use_gpu: bool) -> tuple[int, int, torch.device]:
    """This process's rank, the world size and its device; the process group joined (torchrun's environment, or
    a group of one)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world == 1:  # a group of one, with the variables DeepSpeed reads as torchrun would set them
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
        # Kept for the process's lifetime: DeepSpeed caches groups made from it, so a second stage in this process
        # (another `run_local` call) must find the same group, not a new one.
        atexit.register(dist.destroy_process_group)
    return rank, world, device


def run_local(config: StageConfig, storage: str | os.PathLike, run_name: str | None = None) -> StageResult:
    """Train one stage in this process (and its torchrun peers), resuming from the run's latest checkpoint.

    Raises:
        jobs.train.preflight.MemoryPlanError: when the stage cannot fit its GPUs (before anything is built).
        RuntimeError: when the stage ends without a checkpoint at its last step.
    """
    called = time.time()
    rank, world, device = _join_process_group(config.use_gpu)
    return _run(config, storage, run_name, rank, world, device, called)


def _run(
    config: StageConfig, storage, run_name, rank: int, world: int, device: torch.device, called: float
) -> StageResult:
    from jobs.train.preflight import preflight

    config.check_runnable()
    if not config.min_workers <= world <= config.max_workers or (not config.elastic and config.workers != world):
        config = config.replace(workers=world)  # the processes torchrun started are the workers
    root = Path(storage) / (run_name or config.name)
    root.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        preflight(config)
    checkpoints = LocalCheckpoints(root, rank, world, config.keep_last)
    latest = checkpoints.latest()
    recipe = StageRecipe(
        config,
        rank,
        world,
        checkpoints=checkpoints,
        device=device,
        metrics=JsonlMetrics(root / METRICS_FILE) if rank == 0 else None,
        startup=[("called", called)],
    )
    recipe.setup(latest)
    resumed_from = recipe.step
    metrics = recipe.train()
    dist.barrier()
    final = checkpoints.latest()
    state = json.loads((final / "trainer_state.json").read_text()) if final else {}
    if state.get("step") != recipe.total_steps:
        raise RuntimeError(f"stage {config.name}: no complete checkpoint at step {recipe.total_steps} in {root}")
    metrics = metrics or state["metrics"]  # resumed at the last step: nothing ran, the checkpoint has the figures
    return StageResult(
        config.name, str(final), str(final / "model"), recipe.step, metrics, None, resumed_from=resumed_from
    )

"""Helpers shared by the unit, integration and reliability tests of training stages."""

from __future__ import annotations

from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from jobs.tracking.runs import client
from jobs.train.config import CONFIG_DIR, StageConfig


def tiny(stage: int, data: Path, **changes) -> StageConfig:
    return StageConfig.from_yaml(CONFIG_DIR / "tiny" / f"stage{stage}.yaml").replace(data=str(data), **changes)


def train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "name"]):
        title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "RayTrainWorker" in title:
            found.append(p)
    return found


def stage_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def loss_history(tracking: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(tracking).get_metric_history(run_id, "train/loss"))

"""Helpers shared by the unit, integration and reliability tests of training stages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from jobs.tracking.runs import client
from jobs.train.config import CONFIG_DIR, StageConfig

ROOT = Path(__file__).resolve().parents[1]
# Ray and MLflow made unimportable (what `importlib.util.find_spec` reports for a package that is not installed),
# then the `convllava` command in this one process; it prints which of the two it loaded after all.
WITHOUT_RAY_OR_MLFLOW = """
import sys
for name in ("ray", "mlflow"):
    sys.modules[name] = None
from jobs.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
loaded = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("ray", "mlflow"))
print("LOADED", loaded)
sys.exit(code)
"""


def cli_without_ray_or_mlflow(*args: str) -> subprocess.CompletedProcess:
    """`convllava ARGS` in a process of its own where Ray and MLflow cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_MLFLOW, *args], cwd=ROOT, capture_output=True, text=True
    )


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

"""The stage recipe without Ray or MLflow: `convllava train --local` in one process and under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from train_harness import cli_without_ray_or_mlflow

ROOT = Path(__file__).resolve().parents[2]
TINY_STAGE1 = ROOT / "jobs" / "configs" / "tiny" / "stage1.yaml"

pytestmark = pytest.mark.integration


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_stage_trains_in_one_process_with_neither_ray_nor_mlflow(shards, tmp_path):
    args = [
        "train",
        "--local",
        "--config",
        str(TINY_STAGE1),
        "--workdir",
        str(tmp_path),
        f"data={shards}",
        "max_steps=3",
        "checkpoint_every=2",
        "keep_last=1",
    ]
    out = cli_without_ray_or_mlflow(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout
    run = tmp_path / "runs" / "stage1"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000003"]  # keep_last=1
    state = json.loads((run / "checkpoint_000003" / "trainer_state.json").read_text())
    assert state["step"] == state["total_steps"] == 3 and state["world_size"] == 1  # stage1.yaml says 2 workers
    assert _steps(run) == [1, 2, 3] and (run / "trainable_parameters.txt").read_text().startswith("module")
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    startup = {k for k in first if k.startswith("startup/")}  # run_local's call → step 1, with step 1 only
    assert startup == {f"startup/{p}_s" for p in ("model", "engine", "first_step", "total")}, first
    assert (run / "checkpoint_000003" / "model" / "model.safetensors").is_file()
    assert f"final loss {state['metrics']['train/loss']:.4f}" in out.stdout


def test_torchrun_trains_two_ranks_and_a_rerun_resumes_exactly(shards, tmp_path):
    """Two processes under torchrun (gloo): 4 steps with checkpoints at 2 and 4. With checkpoint 4 removed, the same
    command resumes from step 2 and ends with the same weights, bit for bit, and every step logged once."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29761",
        "-m",
        "--",
        "jobs.cli",
        "train",
        "--local",
        "--config",
        str(TINY_STAGE1),
        "--workdir",
        str(tmp_path),
        f"data={shards}",
        "max_steps=4",
        "checkpoint_every=2",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "stage1"
    final = run / "checkpoint_000004"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000004"]
    assert sorted(p.name for p in final.glob("COMPLETE.rank*.json")) == ["COMPLETE.rank0.json", "COMPLETE.rank1.json"]
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    weights = load_file(str(final / "model" / "model.safetensors"))
    losses = {
        json.loads(line)["step"]: json.loads(line)["train/loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
    }

    import shutil

    shutil.rmtree(final)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stage1: resumed at step 2" in second.stdout
    again = load_file(str(final / "model" / "model.safetensors"))
    assert again.keys() == weights.keys()
    assert all((again[k] == weights[k]).all() for k in weights), "the resumed run's weights differ"
    assert _steps(run) == [1, 2, 3, 4]  # steps 3 and 4 were not logged twice
    assert f"final loss {losses[4]:.4f}" in second.stdout

"""The quickstart: the sample photos' shards, `convllava train --local` with jobs/configs/quickstart.yaml, answers."""

import json

import pytest
from train_harness import cli_without_ray_or_mlflow

from convllava.data.shards import Manifest
from jobs.quickstart import QUICKSTART_CONFIG
from jobs.train.config import StageConfig

pytestmark = pytest.mark.integration


def test_quickstart_trains_the_shipped_stage_without_ray_and_names_every_real_photo(tmp_path):
    out = cli_without_ray_or_mlflow("quickstart", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "8/8 photos named correctly" in out.stdout and "LOADED []" in out.stdout

    manifest = Manifest.load(str(tmp_path / "shards"))  # a caption and a subject question per photo
    assert (manifest.written, manifest.quarantined, sorted(manifest.sources)) == (16, 0, ["captions", "instruct"])
    run = tmp_path / "runs" / "quickstart"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = StageConfig.from_yaml(QUICKSTART_CONFIG)
    (final,) = run.glob("checkpoint_*")  # keep_last: 1
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == state["total_steps"] == steps[-1]["step"] and state["world_size"] == 1
    assert state["total_steps"] >= config.epochs  # every epoch makes at least one step of the 16 samples
    assert steps[-1]["train/loss"] < 0.2 * steps[0]["train/loss"]
    assert (final / "model" / "model.safetensors").is_file()

    # Again in the same work dir: the shards are reused and the finished run resumes at its last step (none runs).
    # (In a process of its own: a local run keeps its process group, and the MASTER_PORT it set, until its process
    # exits, which would leave this test session's later torchrun children a port in use.)
    again = cli_without_ray_or_mlflow("quickstart", "--workdir", str(tmp_path))
    assert again.returncode == 0 and "8/8 photos named correctly" in again.stdout, again.stderr[-3000:]
    assert Manifest.load(str(tmp_path / "shards")).run.reused == 16
    assert [p.name for p in run.glob("checkpoint_*")] == [final.name]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(steps)

"""Kill tests: a training worker killed mid-stage resumes to the same weights and losses; a pipeline driver killed
mid-DAG resumes its execution without redoing finished stages or logging a step twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import torch
from pipeline_harness import NODES, pipeline_cli, runs_of, small_config
from train_harness import loss_history, stage_weights, tiny, train_workers

from jobs.tracking.runs import client, default_tracking_uri
from jobs.train.driver import run_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    """A stage of 8 steps run through without a failure, checkpointing every 2: (config, storage, tracking, result)."""
    where = tmp_path_factory.mktemp("uninterrupted")
    tracking = default_tracking_uri(where)
    config = tiny(1, shards, max_steps=8, checkpoint_every=2, keep_last=3)
    return config, where / "runs", tracking, run_stage(config, str(where / "runs"), tracking, run_name="reference")


def test_killed_worker_resumes_exactly(uninterrupted, tmp_path):
    config, _, tracking, reference = uninterrupted

    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(
            result=run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking, run_name="killed")
        )
    )
    thread.start()
    marker = tmp_path / "runs" / "killed" / "checkpoint_000004"
    deadline = time.time() + 600
    while not marker.exists() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    workers = train_workers()
    assert marker.exists() and workers, "no checkpoint_000004 or no worker to kill"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join()
    result = outcome["result"]
    assert result.steps == reference.steps == 8
    final, expected = stage_weights(result.model_uri), stage_weights(reference.model_uri)
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final), "resumed run diverged from the uninterrupted one"
    history = loss_history(tracking, result.run_id)
    assert [s for s, _ in history] == list(range(1, 9))  # no duplicated steps after the restart
    assert [v for _, v in history] == [v for _, v in loss_history(tracking, reference.run_id)]


def test_a_final_checkpoint_ray_train_never_registered_ends_the_stage(uninterrupted):
    """The driver dies in the second after the last checkpoint is complete in storage and before Ray Train's
    controller registers it (its record still names the one before): the rerun resumes at the last step, trains
    nothing, and hands on the complete final checkpoint, not Ray Train's older one and not an error."""
    config, storage, tracking, first = uninterrupted
    snapshot_file = storage / "reference" / "checkpoint_manager_snapshot.json"
    snapshot = json.loads(snapshot_file.read_text())
    kept = ["checkpoint_000004", "checkpoint_000006", "checkpoint_000008"]
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == kept
    # Ray Train's record as it stood after registering checkpoint 6 (the last report not yet counted)
    snapshot["checkpoint_results"] = snapshot["checkpoint_results"][:-1]
    snapshot["checkpoint_report_indices"] = snapshot["checkpoint_report_indices"][:-1]
    snapshot["latest_checkpoint_result"] = snapshot["checkpoint_results"][-1]
    snapshot["current_report_index"] -= 1
    snapshot_file.write_text(json.dumps(snapshot))

    again = run_stage(config, str(storage), tracking_uri=tracking, run_name="reference")
    assert again.steps == first.steps == 8
    assert again.checkpoint_uri == first.checkpoint_uri == str(storage / "reference" / "checkpoint_000008")
    final, expected = stage_weights(again.model_uri), stage_weights(first.model_uri)
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [s for s, _ in loss_history(tracking, first.run_id)] == list(range(1, 9))
    assert loss_history(tracking, again.run_id) == []  # the rerun (its own MLflow run here) trained no step


def test_killed_driver_resumes_without_redoing_finished_stages(tmp_path):
    # 56 caption records make 2 or 3 steps an epoch, by how the buckets fill: 2 epochs reach max_steps
    config = small_config(tmp_path / "pipeline.yaml", "kill-test", steps=4, checkpoint_every=2, epochs=2)
    wd = tmp_path / "wd"
    cli = pipeline_cli(config, wd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        # Ray Train resumes from the checkpoints its controller registered (its snapshot), not from every folder
        # the ranks finished: wait until checkpoint 2 is registered, or the rerun rightly starts stage 2 over.
        snapshots = list((wd / "runs").glob("stage2-*/checkpoint_manager_snapshot.json"))
        if snapshots and "checkpoint_000002" in snapshots[0].read_text():
            break
        time.sleep(0.5)
    assert first.poll() is None, "the pipeline ended before stage 2 checkpointed"
    os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started (its local Ray)
    first.wait()
    stage1_dirs = sorted(p.name for p in (wd / "runs").glob("stage1-*"))
    second = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in (wd / "runs").glob("stage1-*")) == stage1_dirs  # stage 1 was not trained again
    tracking = default_tracking_uri(wd)
    parents, children = runs_of(tracking, "kill-test")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the interrupted execution was continued
    kids = children[parents[0].info.run_id]
    assert all(kids[n].info.status == "FINISHED" for n in NODES)
    assert all(kids[n].data.tags["convllava.skipped"] == "false" for n in NODES)  # done once, in this execution
    final = json.loads(sorted((wd / "runs").glob("stage2-*/checkpoint_*/trainer_state.json"))[-1].read_text())
    history = client(tracking).get_metric_history(kids["stage2"].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, final["total_steps"] + 1))  # nothing logged twice
    assert final["step"] == final["total_steps"] == 4
    resumed = re.search(r"\[stage2\] resumed at step (\d+)/(\d+)", second.stdout + second.stderr)
    assert resumed and 2 <= int(resumed[1]) <= final["total_steps"] == int(resumed[2])  # from a checkpoint, not step 0

"""Nodes that disappear: stages on a Ray cluster of real raylets on this machine (`ray.cluster_utils.Cluster`: a head
with no CPUs and two 1-CPU worker nodes, as the issue's spot-node setup), a node removed mid-stage as a preempted
spot node is. Each stage runs as `convllava train --address` / `convllava pipeline run --address` in a process of
its own, with the sample ledger on (`CONVLLAVA_SAMPLE_LEDGER`): every rank records, per step, the samples it
trains, its node and the time. Recovery times (node lost → the next step trained) are printed for the closing note.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from pipeline_harness import small_config

from jobs.tracking.runs import client, default_tracking_uri

ROOT = Path(__file__).resolve().parents[2]
TINY_STAGE1 = ROOT / "jobs" / "configs" / "tiny" / "stage1.yaml"

pytestmark = pytest.mark.integration


class Nodes:
    """The cluster and its two 1-CPU worker nodes; `lose` removes one (its raylet and every process on it), `add`
    starts a fresh one."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.dirs: list[str] = []
        self.gone: list[str] = []  # the node ids removed
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": self._temp()})
        self.workers = [self.add() for _ in range(2)]

    def _temp(self) -> str:  # short: Ray's socket paths live below it
        path = tempfile.mkdtemp(prefix="raynd", dir="/tmp")
        self.dirs.append(path)
        return path

    def add(self):
        node = self.cluster.add_node(num_cpus=1, object_store_memory=200 << 20, temp_dir=self._temp())
        self.cluster.wait_for_nodes()
        return node

    def lose(self, node_id: str | None = None) -> float:
        """Remove the worker node `node_id` (default: the last added); returns when it happened."""
        node = next((n for n in self.workers if n.node_id == node_id), self.workers[-1])
        self.workers.remove(node)
        self.gone.append(node.node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        return time.time()

    def shutdown(self) -> None:
        self.cluster.shutdown()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nodes(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _ledger(folder: Path) -> list[dict]:
    return sorted(
        (json.loads(line) for p in folder.glob("*.jsonl") for line in p.read_text().splitlines()),
        key=lambda e: e["time"],
    )


def _kept(entries: list[dict]) -> dict[int, list[dict]]:
    """step → the entries of the last worker group that trained it (a restarted group redoes the steps after the
    checkpoint it resumes)."""
    by_step: dict[int, list[dict]] = {}
    for e in entries:
        by_step.setdefault(e["step"], []).append(e)
    out = {}
    for step, es in by_step.items():
        last = max(e["resumed_from"] for e in es)
        kept = [e for e in es if e["resumed_from"] == last]
        kept = [e for e in kept if e["time"] >= max(k["time"] for k in kept) - 60]  # the last attempt of that group
        out[step] = kept
    return out


def _start(command: list[str], ledger: Path, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONVLLAVA_SAMPLE_LEDGER": str(ledger)}
    log = open(workdir / "driver.log", "w")  # noqa: SIM115 - the process writes it until it ends
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, workdir: Path, what: str, condition, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{what}: never happened\n{(workdir / 'driver.log').read_text()[-5000:]}")
        time.sleep(0.2)


def _complete(checkpoint: Path) -> bool:
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return False
    world = json.loads(state.read_text())["world_size"]
    return len(list(checkpoint.glob("COMPLETE.rank*.json"))) == world


def _train(nodes: Nodes, tmp_path: Path, shards: Path, *overrides: str) -> tuple[subprocess.Popen, Path, str]:
    tracking = default_tracking_uri(tmp_path)
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "train",
        "--config",
        str(TINY_STAGE1),
        "--address",
        nodes.cluster.address,
        "--storage",
        str(tmp_path / "runs"),
        "--tracking-uri",
        tracking,
        "--run-name",
        "stage",
        "--workdir",
        str(tmp_path),
        f"data={shards}",
        *overrides,
    ]
    return _start(command, tmp_path / "ledger", tmp_path), tmp_path / "runs" / "stage", tracking


def test_an_elastic_stage_spreads_shrinks_when_a_node_is_lost_and_grows_back(nodes, shards, tmp_path):
    """workers=[1,2] on two 1-CPU nodes: one worker on each; the node of one lost after checkpoint 4 and no
    replacement: the stage goes on with one worker from its last checkpoint; a node added again: it grows back to
    two. Every epoch trains each of its samples exactly once, MLflow has the world size of every step and a tag per
    resize, and the stage finishes."""
    proc, run, tracking = _train(
        nodes, tmp_path, shards, "workers=[1,2]", "resize_check_s=5", "epochs=3", "checkpoint_every=2"
    )
    _wait(proc, tmp_path, "checkpoint 4", lambda: _complete(run / "checkpoint_000004"))
    lost = nodes.lose()
    ledger = tmp_path / "ledger"
    _wait(proc, tmp_path, "a step on one worker", lambda: any(e["world_size"] == 1 for e in _ledger(ledger)))
    shrunk = min(e["time"] for e in _ledger(ledger) if e["world_size"] == 1)
    first_small = min(e["step"] for e in _ledger(ledger) if e["world_size"] == 1)
    _wait(proc, tmp_path, "a checkpoint on one worker", lambda: _complete(run / f"checkpoint_{first_small + 1:06d}"))
    added = time.time()
    nodes.workers.append(nodes.add())
    _wait(
        proc,
        tmp_path,
        "two workers again",
        lambda: any(e["world_size"] == 2 and e["time"] > added for e in _ledger(ledger)),
    )
    grown = min(e["time"] for e in _ledger(ledger) if e["world_size"] == 2 and e["time"] > added)
    assert proc.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-5000:]

    entries = _ledger(ledger)
    first = [e for e in entries if e["time"] < lost]
    assert {e["world_size"] for e in first} == {2} and len({e["node"] for e in first}) == 2  # spread over the nodes
    kept = _kept(entries)
    steps = sorted(kept)
    assert steps == list(range(1, len(steps) + 1))
    per_epoch: dict[int, Counter] = {}
    for step in steps:
        for e in kept[step]:
            per_epoch.setdefault(e["epoch"], Counter()).update(e["keys"])
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, counts in per_epoch.items():
        assert max(counts.values()) == 1, (epoch, [k for k, n in counts.items() if n > 1][:5])
    sizes = {per_epoch_len for per_epoch_len in (sum(c.values()) for c in per_epoch.values())}
    assert len(sizes) == 1  # every epoch trained as many samples, whatever its sizes
    worlds = [kept[s][0]["world_size"] for s in steps]
    assert worlds[:4] == [2, 2, 2, 2] and 1 in worlds and worlds[-1] == 2, worlds

    (run_info,) = client(tracking).search_runs([client(tracking).get_experiment_by_name("convllava").experiment_id])
    history = client(tracking).get_metric_history(run_info.info.run_id, "train/world_size")
    latest = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # the kept value of each step
    assert sorted(latest) == steps and [latest[s] for s in steps] == worlds
    # Steps the two workers logged after checkpoint 4, before the loss was noticed, are logged again by the one worker
    # that trains them from checkpoint 4; the earlier values stay beside them (MLflow cannot delete a metric).
    again = sorted(s for s, n in Counter(m.step for m in history).items() if n > 1)
    assert all(s > 4 for s in again) and all(latest[s] == 1 for s in again), (again, worlds)
    resizes = {k: v for k, v in run_info.data.tags.items() if k.startswith("convllava.resize.")}
    assert sorted(resizes.values()) == ["1 -> 2 workers", "2 -> 1 workers"], resizes
    assert run_info.info.status == "FINISHED"
    print(
        f"elastic: node lost → first step on one worker {shrunk - lost:.1f} s; node added → two again {grown - added:.1f} s"
    )


def test_a_fixed_stage_resumes_when_the_lost_node_is_replaced(nodes, shards, tmp_path):
    """workers=2: the node of one worker lost after checkpoint 4, a new node 10 s later: the stage resumes at step 4
    on two workers and finishes; no step is trained twice in what it keeps."""
    proc, run, _ = _train(nodes, tmp_path, shards, "max_steps=10", "epochs=3", "checkpoint_every=2")
    _wait(proc, tmp_path, "checkpoint 4", lambda: _complete(run / "checkpoint_000004"))
    lost = nodes.lose()
    time.sleep(10)
    nodes.workers.append(nodes.add())
    assert proc.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-5000:]
    entries = _ledger(tmp_path / "ledger")
    after = [e for e in entries if e["time"] > lost and e["resumed_from"] > 0]  # the restarted group's steps
    assert after and min(e["resumed_from"] for e in after) >= 4 and {e["world_size"] for e in after} == {2}
    assert len({e["node"] for e in after}) == 2 and not {e["node"] for e in after} & {n for n in nodes.gone}
    assert sorted(_kept(entries)) == list(range(1, 11))
    recovered = min(e["time"] for e in after)
    print(f"fixed size: node lost → replaced after 10 s → next step {recovered - lost:.1f} s after the loss")


def test_a_pipeline_finishes_its_dag_after_losing_a_node_in_stage_2(nodes, tmp_path):
    """The tiny pipeline with elastic stages on the two-node cluster; a node lost while stage 2 trains: stage 2 goes
    on with one worker, and stage 3 and the eval node run: the DAG finishes."""
    import yaml

    config = small_config(tmp_path / "pipeline.yaml", "nodes", steps=8, checkpoint_every=2, epochs=4)
    data = yaml.safe_load(config.read_text())
    for stage in data["stages"].values():
        stage["overrides"]["workers"] = [1, 2]
        stage["overrides"]["global_batch_size"] = 16
    config.write_text(yaml.safe_dump(data))
    wd = tmp_path / "wd"
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "pipeline",
        "run",
        "--config",
        str(config),
        "--workdir",
        str(wd),
        "--address",
        nodes.cluster.address,
    ]
    proc = _start(command, tmp_path / "ledger", tmp_path)
    ledger = tmp_path / "ledger"

    def stage2_step(n: int) -> bool:
        return any(e["step"] >= n for e in _ledger(ledger) if e.get("stage") == "stage2")

    _wait(proc, tmp_path, "stage 2 at step 3", lambda: stage2_step(3))
    lost = nodes.lose()
    assert proc.wait(timeout=1200) == 0, (tmp_path / "driver.log").read_text()[-6000:]
    entries = _ledger(ledger)
    # The two workers may record the step they were starting as the node went (its worker dies a moment after its
    # raylet; the other then hangs until the group is torn down): seen, step 4 of both right after the loss. From the
    # first step on one worker on, every step of stages 2 and 3 is on one worker.
    regrouped = min(e["time"] for e in entries if e["time"] > lost and e["world_size"] == 1)
    in_flight = [e for e in entries if lost < e["time"] < regrouped]
    assert all(e["stage"] == "stage2" and e["world_size"] == 2 for e in in_flight) and len(in_flight) <= 4, in_flight
    after = [e for e in entries if e["time"] >= regrouped]
    assert {e["stage"] for e in after} >= {"stage2", "stage3"}
    assert {e["world_size"] for e in after} == {1}
    out = (tmp_path / "driver.log").read_text()
    assert "eval" in out and "FAILED" not in out
    recovered = min(e["time"] for e in after if e["stage"] == "stage2")
    print(f"pipeline: node lost in stage 2 → its next step {recovered - lost:.1f} s later; the DAG finished")


def _registered(text: str) -> int:
    """The step of Ray Train's latest registered checkpoint in its snapshot's JSON (0: none)."""
    latest = json.loads(text).get("latest_checkpoint_result") if text else None
    return int(latest["checkpoint_dir_name"].split("_")[1]) if latest else 0


def test_a_complete_checkpoint_ray_train_never_registered_is_resumed(nodes, shards, tmp_path):
    """The driver dies once checkpoint 6 is complete in storage while Ray Train's record of checkpoints (its
    snapshot) names an older one, as when the failure lands between the last upload and the registration (here the
    registration lags by itself; should it have caught up, the record it had before is put back). The same command
    resumes from the newest complete checkpoint, not Ray Train's: no step before it is trained again."""
    import psutil

    args = ("max_steps=12", "epochs=3", "checkpoint_every=2", "keep_last=6")
    proc, run, _ = _train(nodes, tmp_path, shards, *args)
    snapshot, seen = run / "checkpoint_manager_snapshot.json", {}

    def at_six() -> bool:
        text = snapshot.read_text() if snapshot.is_file() else ""
        if text:
            seen[_registered(text)] = text
        return _complete(run / "checkpoint_000006")

    _wait(proc, tmp_path, "checkpoint 6", at_six)
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.kill()
    proc.wait()
    newest = max(int(p.name.split("_")[1]) for p in run.glob("checkpoint_*") if _complete(p))
    registered = _registered(snapshot.read_text())
    if registered >= newest:
        older = [step for step in seen if 0 < step < newest]
        assert older, f"never saw Ray Train's record name a checkpoint older than {newest}: {sorted(seen)}"
        snapshot.write_text(seen[max(older)])
        registered = max(older)
    assert 0 < registered < newest

    shutil.move(tmp_path / "driver.log", tmp_path / "first.log")
    again, _, _ = _train(nodes, tmp_path, shards, *args)
    assert again.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-5000:]
    rerun = [e for e in _ledger(tmp_path / "ledger") if e["resumed_from"] > 0]
    assert rerun and {e["resumed_from"] for e in rerun} == {newest}
    assert min(e["step"] for e in rerun) == newest + 1 and max(e["step"] for e in rerun) == 12
    print(
        f"unregistered: Ray Train's record named checkpoint {registered}, storage had {newest} complete: resumed {newest}"
    )

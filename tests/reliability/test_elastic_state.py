"""Elastic stages without Ray: the training state reshards exactly between world sizes, and an epoch resumed at
another size trains the same samples at the same steps, each once.

Checkpoints are written by `convllava train --local` under torchrun (2 ranks, gloo) and restored by
`tests/state_harness.py` at 1 and 2 ranks; what the restore produced is gathered whole and compared bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from jobs.train.config import StageConfig

ROOT = Path(__file__).resolve().parents[2]
TINY_STAGE1 = ROOT / "jobs" / "configs" / "tiny" / "stage1.yaml"

pytestmark = pytest.mark.integration


def _train(workdir: Path, overrides: list[str], nproc: int, port: int, ledger: Path | None = None):
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port), "-m", "--"]
    command = [*head, "jobs.cli", "train", "--local", "--config", str(TINY_STAGE1), "--workdir", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if ledger is not None:
        env["CONVLLAVA_SAMPLE_LEDGER"] = str(ledger)
    done = subprocess.run([*command, *overrides], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _restore(config: Path, world: int, checkpoint: Path, out: Path, port: int, save: Path | None = None):
    command = [sys.executable, str(ROOT / "tests" / "state_harness.py"), "--config", str(config)]
    command += ["--world", str(world), "--checkpoint", str(checkpoint), "--out", str(out), "--port", str(port)]
    if save is not None:
        command += ["--save", str(save)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return load_file(str(out / "full.safetensors")), json.loads((out / "meta.json").read_text())


def _overrides(shards: Path, deepspeed: str, **more) -> list[str]:
    values = {"data": str(shards), "workers": "[1,2]", "deepspeed": deepspeed, "checkpoint_every": 2, **more}
    return [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize("deepspeed", ["zero2", "zero3"])
def test_state_reshards_exactly_n_to_m_to_n(shards, tmp_path, deepspeed):
    """A checkpoint written by 2 ranks, restored at 2, at 1 (and checkpointed again there), and that restored at 2:
    every fp32 master weight, Adam moment, model weight, step, Adam step and learning rate is the same, bit for bit."""
    overrides = _overrides(shards, deepspeed, max_steps=2)
    _train(tmp_path / "wd", overrides, nproc=2, port=29771)
    checkpoint = tmp_path / "wd" / "runs" / "stage1" / "checkpoint_000002"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (checkpoint / "state").iterdir()) == [
        "optimizer.json",
        "rank0.json",
        "rank0.safetensors",
        "rank1.json",
        "rank1.safetensors",
    ]
    assert not list(checkpoint.rglob("*.pt")), "DeepSpeed's pickled states are no longer written"
    config = StageConfig.from_yaml(TINY_STAGE1, overrides)
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.to_dict()))

    at2, meta2 = _restore(config_json, 2, checkpoint, tmp_path / "at2", 29772)
    at1, meta1 = _restore(config_json, 1, checkpoint, tmp_path / "at1", 29773, save=tmp_path / "resaved")
    again = tmp_path / "resaved" / "checkpoint_000002"
    assert json.loads((again / "trainer_state.json").read_text())["world_size"] == 1
    back, meta_back = _restore(config_json, 2, again, tmp_path / "back", 29774)

    trainable = {k.split("::")[0] for k in at2 if not k.startswith("model::")}
    assert len(trainable) >= 4 and {k.split("::")[1] for k in at2 if "::" in k} >= {"fp32", "exp_avg", "exp_avg_sq"}
    assert any(float(at2[f"{n}::exp_avg_sq"].abs().sum()) > 0 for n in trainable)  # moments that carry information
    for name, restored in (("at 1 rank", at1), ("back at 2 ranks", back)):
        assert restored.keys() == at2.keys(), name
        differ = [k for k in at2 if not torch.equal(at2[k], restored[k])]
        assert not differ, f"restored {name}: {differ[:5]} differ"
    for meta in (meta1, meta_back):
        for key in ("step", "adam_steps", "lrs", "scheduler_last_epoch", "global_steps", "global_samples"):
            assert meta[key] == meta2[key], (key, meta, meta2)
    assert meta2["step"] == 2 and meta2["adam_steps"] == [2.0]
    assert meta1["resized_from"] == 2 and meta2["resized_from"] is None and meta_back["resized_from"] == 1


def _ledger(folder: Path) -> dict[int, list[str]]:
    """step → the keys all ranks trained at it. A step a killed run began is done again by the next run: the
    entries of the last run that did a step (the highest step it resumed from) hold."""
    by_step: dict[int, list[dict]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            by_step.setdefault(entry["step"], []).append(entry)
    out = {}
    for step, entries in by_step.items():
        last = max(e["resumed_from"] for e in entries)
        kept = [e for e in entries if e["resumed_from"] == last]
        assert sorted(e["rank"] for e in kept) == list(range(kept[0]["world_size"])), (step, kept)
        out[step] = sorted(k for e in kept for k in e["keys"])
    return out


def _train_until(workdir: Path, overrides: list[str], nproc: int, port: int, ledger: Path, step: int) -> None:
    """`_train`, killed (the whole process group, as a lost node) once checkpoint `step` is complete."""
    head = [sys.executable, "-m"]
    if nproc > 1:
        head += ["torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port), "-m", "--"]
    command = [*head, "jobs.cli", "train", "--local", "--config", str(TINY_STAGE1), "--workdir", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CONVLLAVA_SAMPLE_LEDGER": str(ledger)}
    proc = subprocess.Popen(
        [*command, *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoint = workdir / "runs" / "stage1" / f"checkpoint_{step:06d}"
    try:
        while proc.poll() is None and len(list(checkpoint.glob("COMPLETE.rank*.json"))) < nproc:
            time.sleep(0.02)
    finally:  # torchrun starts its workers in sessions of their own: the whole tree, as a lost node takes it
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert len(list(checkpoint.glob("COMPLETE.rank*.json"))) == nproc, f"no complete {checkpoint.name}"


def test_an_epoch_resumed_at_another_size_trains_each_sample_once(shards, tmp_path):
    """One epoch of an elastic stage: uninterrupted on 2 ranks; and on 2 ranks killed after checkpoint 2 (a node
    lost), resumed on 1 rank and killed after checkpoint 4, resumed on 2 (the node came back) to the end. Each step
    trains the same samples in both runs, every sample of the epoch once (the ledger), and the resized run ends close
    to the uninterrupted one (the same global batches, sums in another order)."""
    overrides = _overrides(shards, "zero2", epochs=1)
    _train(tmp_path / "ref", overrides, nproc=2, port=29781, ledger=tmp_path / "ledger-ref")
    reference = _ledger(tmp_path / "ledger-ref")
    steps = len(reference)
    assert steps >= 6, reference.keys()

    wd, ledger = tmp_path / "resized", tmp_path / "ledger"
    _train_until(wd, overrides, nproc=2, port=29782, ledger=ledger, step=2)
    _train_until(wd, overrides, nproc=1, port=0, ledger=ledger, step=4)
    done = _train(wd, overrides, nproc=2, port=29783, ledger=ledger)
    assert "written by 1 workers, now 2" in done.stdout, done.stdout[-2000:]
    resized = _ledger(ledger)
    assert sorted(resized) == list(range(1, steps + 1))
    assert resized == reference, "a step trained other samples after a resize"
    counts = Counter(k for keys in resized.values() for k in keys)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
    assert sum(counts.values()) == sum(len(keys) for keys in reference.values())

    run, ref = wd / "runs" / "stage1", tmp_path / "ref" / "runs" / "stage1"
    final = load_file(str(run / f"checkpoint_{steps:06d}" / "model" / "model.safetensors"))
    expected = load_file(str(ref / f"checkpoint_{steps:06d}" / "model" / "model.safetensors"))
    worst = max(float((final[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-3, worst
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    latest = {m["step"]: m for m in metrics}  # a step a killed group logged after its checkpoint: logged again
    assert sorted(latest) == list(range(1, steps + 1))
    again = [s for s, n in Counter(m["step"] for m in metrics).items() if n > 1]
    assert all(s > 2 for s in again), again  # only steps after the first resize point (checkpoint 2) are redone
    sizes = [latest[s]["train/world_size"] for s in sorted(latest)]
    assert sizes[:2] == [2, 2] and 1 in sizes and sizes[-1] == 2, sizes
    tags = json.loads((run / "tags.json").read_text())
    assert sorted(tags.values()) == ["1 -> 2 workers", "2 -> 1 workers"], tags
    assert all(k.startswith("convllava.resize.step_") for k in tags)


def test_an_elastic_config_says_which_sizes_its_global_batch_cannot_split():
    with pytest.raises(ValueError, match=r"at \[3\] workers.*multiple of 48"):
        StageConfig.from_yaml(TINY_STAGE1, ["workers=[2,4]", "global_batch_size=32", "micro_batch_size=4"])
    with pytest.raises(ValueError, match=r"workers: give a number or \[MIN, MAX\]"):
        StageConfig.from_yaml(TINY_STAGE1, ["workers=[2,1]"])
    config = StageConfig.from_yaml(TINY_STAGE1, ["workers=[1,2]"])
    assert (config.elastic, config.min_workers, config.max_workers, config.accum_at(1), config.accum_at(2)) == (
        True,
        1,
        2,
        4,
        2,
    )
    assert StageConfig.from_dict(config.to_dict()) == config
    assert StageConfig.from_yaml(TINY_STAGE1, []).elastic is False


def test_metric_logger_logs_the_steps_after_a_resize_again_and_a_reproduced_step_once(tmp_path):
    """A run restarted at the same size reproduces its steps: each is logged once. Resumed at another size from
    checkpoint 4 after the lost group logged steps 5-6: steps 5-6 are logged again, the later value the kept one."""
    from jobs.tracking.runs import MetricLogger, client, default_tracking_uri, start_run

    uri = default_tracking_uri(tmp_path)
    run_id = start_run(uri, "convllava", "resize")
    first = MetricLogger(uri, run_id)
    for step in range(1, 7):
        first.log(step, {"train/loss": 1.0, "train/world_size": 2})
    assert first.close(timeout_s=60) == []

    same = MetricLogger(uri, run_id)  # restarted from checkpoint 4 at the same size
    for step in (5, 6, 7):
        same.log(step, {"train/loss": 1.0, "train/world_size": 2})
    assert same.close(timeout_s=60) == []
    resized = MetricLogger(uri, run_id)  # restarted from checkpoint 4 at one worker
    resized.rewind(4)
    for step in (5, 6, 7, 8):
        resized.log(step, {"train/loss": 1.0, "train/world_size": 1})
    assert resized.close(timeout_s=60) == []

    history = client(uri).get_metric_history(run_id, "train/world_size")
    assert Counter(m.step for m in history) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 1}
    latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.timestamp, m.value == 1))}
    assert latest == {1: 2, 2: 2, 3: 2, 4: 2, 5: 1, 6: 1, 7: 1, 8: 1}

"""Concurrency: a second `pipeline run` on a busy work dir refuses and touches nothing; the lock never outlives
a killed holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "convllava")
HOLD = (
    "from pathlib import Path; import time, sys; from jobs.dag.runner import workdir_lock\n"
    "with workdir_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n"
)


def _holder(workdir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_pipeline_run_refuses_and_touches_nothing(tmp_path):
    workdir = tmp_path / "wd"
    holder = _holder(workdir)
    try:
        before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
        second = subprocess.run(
            [CLI, "pipeline", "run", "--config", str(ROOT / "jobs/configs/demo.yaml"), "--workdir", str(workdir)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert second.returncode != 0
        assert f"{workdir} is in use by another pipeline run (pid {holder.pid})" in second.stderr
        assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    from jobs.dag.runner import workdir_lock

    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with workdir_lock(tmp_path):  # a killed driver never leaves the work dir locked (flock dies with it)
        assert (tmp_path / ".pipeline.lock").read_text() == f"pid {os.getpid()}"


def test_a_waiting_pipeline_refuses_after_wait_s_and_runs_once_the_holder_is_gone(tmp_path):
    """`retrain` waits its turn (wait_s): it refuses naming the holder when the wait runs out, and takes the lock as
    soon as the holder dies while it waits."""
    import threading
    import time

    import pytest

    from jobs.dag.runner import PipelineLocked, workdir_lock

    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(PipelineLocked, match=rf"in use by another pipeline run \(pid {holder.pid}\)"):
            with workdir_lock(tmp_path, wait_s=1.5):
                pass
        assert time.monotonic() - start >= 1.5
        threading.Timer(1.0, holder.kill).start()
        start = time.monotonic()
        with workdir_lock(tmp_path, wait_s=60):
            assert (tmp_path / ".pipeline.lock").read_text() == f"pid {os.getpid()}"
        assert 1.0 <= time.monotonic() - start < 30
    finally:
        holder.kill()
        holder.wait()

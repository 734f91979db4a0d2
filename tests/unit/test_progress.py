"""The progress view: lines in a log, one live line in a terminal (a real pty), steps from a Ray worker."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.progress import LineProgress, LiveProgress, Progress, progress_for

ROOT = Path(__file__).resolve().parents[2]
STEP = {"train/loss": 6.25, "train/samples_per_s": 72.5, "train/step_time_s": 0.5}
LIVE_SCRIPT = r"""
import time
from jobs.progress import progress_for
with progress_for(5) as p:
    with p.node(2, "stage1"):
        print("a line printed by someone else")
        for i in (1, 2, 3):
            p.step(i, 3, {"train/loss": 6.0 - i, "train/samples_per_s": 70.0, "train/step_time_s": 0.3})
            time.sleep(0.6)
        p.finished("ran", 2.0, ("train/loss", 3.0))
print("after the view")
"""


def test_lines_one_per_node_start_end_and_logged_step():
    out = io.StringIO()
    p = LineProgress(5, out)
    with p.node(2, "stage1"):
        p.step(5, 20, STEP)
        p.step(10, 20, {**STEP, "train/loss": 5.5})
        p.finished("ran", 12.34, ("train/loss", 5.5))
    with pytest.raises(ValueError), p.node(3, "stage2"):
        raise ValueError("boom")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[2/5] stage1 started"
    assert lines[1] == "[2/5] stage1 step 5/20  loss 6.2500  72.5 samples/s  ETA 0:08"  # 15 steps × 0.5 s
    assert re.fullmatch(r"\[2/5\] stage1 step 10/20  loss 5\.5000  72\.5 samples/s  ETA 0:00", lines[2])
    assert lines[3] == "[2/5] stage1 ran in 12.3 s, train/loss = 5.5000"
    assert lines[4] == "[3/5] stage2 started"
    assert re.fullmatch(r"\[3/5\] stage2 failed after 0\.\d s: ValueError", lines[5])
    assert len(lines) == 6


def test_eta_from_the_rate_between_logged_steps(monkeypatch):
    clock = iter([100.0, 110.0])  # 10 s for steps 10 → 20
    monkeypatch.setattr("jobs.progress.time.time", lambda: next(clock))
    p = Progress(5)
    p.step(10, 100, STEP)
    assert p.step_state["eta"] == pytest.approx(90 * 0.5)  # first event: the step's own time
    p.step(20, 100, STEP)
    assert p.step_state["eta"] == pytest.approx(80 * 1.0)  # then the measured rate, 1 s/step


def test_skipped_node_line():
    out = io.StringIO()
    p = LineProgress(5, out)
    with p.node(1, "preprocess"):
        p.finished("skipped", 0.0, ("written", 112.0))
    assert out.getvalue().splitlines()[-1] == "[1/5] preprocess skipped, written = 112.0000"


def test_mode_from_terminal_or_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("CONVLLAVA_PROGRESS", raising=False)
    assert type(progress_for(5, stream=io.StringIO())) is LineProgress
    live = progress_for(5, stream=Tty())
    try:
        assert type(live) is LiveProgress and sys.stdout is not live._originals[0]
    finally:
        live.close()
    assert sys.stdout is live._originals[0]  # closing gives the streams back
    monkeypatch.setenv("CONVLLAVA_PROGRESS", "off")
    assert type(progress_for(5, stream=Tty())) is Progress
    monkeypatch.setenv("CONVLLAVA_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="CONVLLAVA_PROGRESS='fancy': expected one of live, lines, off"):
        progress_for(5)


def test_live_view_in_a_terminal():
    """Under a real pseudo-terminal: one line redrawn in place, other output above it whole, the end line kept."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_SCRIPT],
        stdout=child,
        stderr=child,
        cwd=ROOT,
        env={**os.environ, "CONVLLAVA_PROGRESS": ""},
    )
    os.close(child)
    raw = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait() == 0, raw.decode()
    text = raw.decode()
    assert "started" not in text  # no start line: the live line is the start
    redraws = [part for part in text.split("\r\x1b[K") if part.startswith("[2/5] stage1  step")]
    assert len(redraws) >= 3 and all("\n" not in r for r in redraws)  # always the same screen line
    assert {r.split("  ")[1] for r in redraws} == {"step 1/3", "step 2/3", "step 3/3"}
    assert "loss 3.0000  70.0 samples/s  ETA 0:00" in text
    lines = [line for line in text.replace("\r\x1b[K", "\n").replace("\r\n", "\n").split("\n") if line]
    assert "a line printed by someone else" in lines  # whole, on its own line
    assert lines[-2:] == ["[2/5] stage1 ran in 2.0 s, train/loss = 3.0000", "after the view"]

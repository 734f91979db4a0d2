"""What the user sees while a pipeline or a stage runs.

In a terminal: one live line (node k/N, step i/total, loss, samples/s, ETA, elapsed) redrawn in place, with
every other line (ours, Ray's copies of worker output) printed above it. In a log (stdout not a terminal): one
line when a node starts, one when it ends, and one per logged training step (the stage's `log_every`).
`CONVLLAVA_PROGRESS=live|lines|off` overrides the choice.

Steps reach the driver through `StepFeed`: rank 0's metric sink (`FeedMetrics`) pushes each logged step to a
small Ray actor, which a driver thread drains twice a second. MLflow is never polled for it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from jobs.tracking.vocabulary import TRAIN_LOSS, TRAIN_SAMPLES_PER_S, TRAIN_STEP_TIME_S

MODES = ("live", "lines", "off")
REDRAW_S = 0.5
PUSH_WAIT_S = 10.0  # how long rank 0 waits, at the end of a stage, for its last steps to reach the driver


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


class Progress:
    """Node and step events → lines. The base prints nothing (`off`); `LineProgress` and `LiveProgress` show them."""

    live = False

    def __init__(self, total_nodes: int, stream: TextIO | None = None) -> None:
        self.total_nodes, self.stream = total_nodes, stream
        self.index, self.current, self.node_start = 0, "", 0.0
        self.step_state: dict[str, Any] | None = None  # last step seen: step, total, loss, samples/s, ETA
        self._steps_seen: list[tuple[float, int]] = []  # (time, step) of this node's step events

    # ------------------------------------------------------------------ events
    @contextmanager
    def node(self, index: int, node: str) -> Iterator[None]:
        """A node's span: its start line, then its end line (`finished` with the outcome, or the error)."""
        self.index, self.current, self.node_start = index, node, time.time()
        self.step_state, self._steps_seen = None, []
        if self.live:
            self.on_step()  # the live line shows it at once
        else:
            self.emit(f"{self._prefix()} started")
        try:
            yield
        except BaseException as e:
            line = f"{self._prefix()} failed after {time.time() - self.node_start:.1f} s: {type(e).__name__}"
            self.current, self.step_state = "", None
            self.emit(line)
            raise

    def finished(self, status: str, seconds: float, metric: tuple[str, float] | None) -> None:
        shown = f", {metric[0]} = {metric[1]:.4f}" if metric else ""
        took = f" in {seconds:.1f} s" if status == "ran" else ""
        line = f"{self._prefix()} {status}{took}{shown}"
        self.current, self.step_state = "", None
        self.emit(line)

    def step(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """A logged training step of the current node."""
        now = time.time()
        self._steps_seen.append((now, step))
        (t0, s0) = self._steps_seen[0]
        per_step = (now - t0) / (step - s0) if step > s0 else metrics.get(TRAIN_STEP_TIME_S, 0.0)
        self.step_state = {
            "step": step,
            "total": total,
            "loss": metrics.get(TRAIN_LOSS),
            "samples_per_s": metrics.get(TRAIN_SAMPLES_PER_S),
            "eta": per_step * (total - step),
            "at": now,
        }
        self.on_step()

    def on_step(self) -> None:
        pass

    def emit(self, line: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ formatting
    def _prefix(self) -> str:
        return f"[{self.index}/{self.total_nodes}] {self.current}"

    def step_text(self, since: float = 0.0) -> str:
        """The last step's figures; the ETA as of `since` seconds after that step arrived."""
        s = self.step_state
        if s is None:
            return ""
        parts = [f"step {s['step']}/{s['total']}"]
        if s["loss"] is not None:
            parts.append(f"loss {s['loss']:.4f}")
        if s["samples_per_s"] is not None:
            parts.append(f"{s['samples_per_s']:.1f} samples/s")
        parts.append(f"ETA {_clock(s['eta'] - since)}")
        return "  ".join(parts)


class LineProgress(Progress):
    """For logs: every event is one line."""

    def emit(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def on_step(self) -> None:
        self.emit(f"{self._prefix()} {self.step_text()}")


class LiveProgress(Progress):
    """For a terminal: node and step on one line, redrawn in place every `REDRAW_S` (elapsed and ETA tick between
    steps). While it is open, `sys.stdout` and `sys.stderr` clear the line before any other output and redraw it
    after, so prints and Ray's copies of worker output appear above it, whole."""

    live = True

    def __init__(self, total_nodes: int, stream: TextIO | None = None) -> None:
        super().__init__(total_nodes, stream or sys.stdout)
        self._lock = threading.RLock()
        self._shown = False  # the live line is on screen (and the cursor at its end)
        self._originals = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _AboveLive(sys.stdout, self), _AboveLive(sys.stderr, self)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="convllava-progress", daemon=True)
        self._ticker.start()

    def line(self) -> str:
        if not self.current:
            return ""
        elapsed = _clock(time.time() - self.node_start)
        since = time.time() - self.step_state["at"] if self.step_state else 0.0  # the ETA counts down between steps
        text = self.step_text(since)
        return f"{self._prefix()}  {text}  [{elapsed}]" if text else f"{self._prefix()}  [{elapsed}]"

    def draw(self) -> None:
        with self._lock:
            text = self.line()
            if text:
                self.stream.write("\r\x1b[K" + text)
                self.stream.flush()
            self._shown = bool(text)

    def clear(self) -> None:
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._shown = False

    def emit(self, line: str) -> None:
        with self._lock:
            self.clear()
            self.stream.write(line + "\n")
            self.draw()

    def on_step(self) -> None:
        self.draw()

    def _tick(self) -> None:
        while not self._stop.wait(REDRAW_S):
            with self._lock:
                if self._shown or not any(s.mid_line for s in (sys.stdout, sys.stderr) if isinstance(s, _AboveLive)):
                    self.draw()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.clear()
        sys.stdout, sys.stderr = self._originals


class _AboveLive:
    """A text stream that writes above the live line: clear it, write, redraw once the write ends a line."""

    def __init__(self, inner: TextIO, view: LiveProgress) -> None:
        self.inner, self.view, self.mid_line = inner, view, False

    def write(self, text: str) -> int:
        with self.view._lock:
            self.view.clear()
            n = self.inner.write(text)
            self.inner.flush()
            if text:
                self.mid_line = not text.endswith("\n")
            if not self.mid_line:
                self.view.draw()
            return n

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def progress_for(total_nodes: int, mode: str | None = None, stream: TextIO | None = None) -> Progress:
    """`live` when the stream (stdout) is a terminal, else `lines`; `mode` or `CONVLLAVA_PROGRESS` decides first."""
    stream = stream or sys.stdout
    mode = mode or os.environ.get("CONVLLAVA_PROGRESS") or ("live" if stream.isatty() else "lines")
    if mode not in MODES:
        raise ValueError(f"CONVLLAVA_PROGRESS={mode!r}: expected one of {', '.join(MODES)}")
    return {"live": LiveProgress, "lines": LineProgress, "off": Progress}[mode](total_nodes, stream)


# ---------------------------------------------------------------------- from rank 0 to the driver
class _StepQueue:
    def __init__(self) -> None:
        self.items: list[tuple[int, int, dict[str, float]]] = []

    def push(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.items.append((step, total, metrics))

    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        items, self.items = self.items, []
        return items


class StepFeed:
    """Rank 0's logged steps, delivered to `on_step(step, total, metrics)` on the driver while a stage runs. `handle`
    goes to the workers (inside the train loop config); `close` delivers what is left and stops the actor."""

    def __init__(self, on_step: Callable[[int, int, dict[str, float]], None]) -> None:
        import ray

        self.on_step = on_step
        self.handle = ray.remote(num_cpus=0)(_StepQueue).remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="convllava-step-feed", daemon=True)
        self._thread.start()

    def _deliver(self) -> None:
        import ray

        for step, total, metrics in ray.get(self.handle.drain.remote(), timeout=30):
            self.on_step(step, total, metrics)

    def _run(self) -> None:
        while not self._stop.wait(REDRAW_S):
            try:
                self._deliver()
            except Exception:  # noqa: BLE001 - progress must never stop a stage; the next poll tries again
                pass

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self._deliver()
        except Exception:  # noqa: BLE001
            pass
        ray.kill(self.handle)


class FeedMetrics:
    """Rank 0's metric sink on a Ray Train worker: what it logs goes to `inner` (MLflow, or None) and, as a step
    event, to the driver's `StepFeed`. `total` is read when a step is logged (the recipe knows it after setup)."""

    def __init__(self, inner, feed, total: Callable[[], int]) -> None:
        self.inner, self.feed, self.total = inner, feed, total
        self._last = None  # the latest push: one caller's calls to an actor run in order, so it marks them all

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.inner is not None:
            self.inner.log(step, metrics)
        self._last = self.feed.push.remote(step, self.total(), metrics)  # fire and forget until close

    def rewind(self, step: int) -> None:
        if self.inner is not None:
            self.inner.rewind(step)

    def log_text(self, text: str, name: str) -> None:
        if self.inner is not None:
            self.inner.log_text(text, name)

    def set_tag(self, key: str, value: str) -> None:
        if self.inner is not None:
            self.inner.set_tag(key, value)

    def unsent(self) -> list[list]:
        return self.inner.unsent() if self.inner is not None else []

    def requeue(self, rows: list[list]) -> None:
        if self.inner is not None:
            self.inner.requeue(rows)

    def close(self) -> Any:
        """Wait (bounded) until the driver's queue holds every step pushed so far: a push still in flight when the
        stage returns would reach a queue the driver has already drained, and the last step would never show."""
        if self._last is not None:
            import ray

            ray.wait([self._last], timeout=PUSH_WAIT_S)
        return self.inner.close() if self.inner is not None else None

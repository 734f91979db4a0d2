"""Reliability: the tracking server stopped mid-stage, and the metric logger that never blocks training, reports
what it could not send and sends it again, each step exactly once."""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
import threading
import time
from pathlib import Path

import pytest
from tracking_harness import free_port
from train_harness import tiny

from jobs.tracking.runs import MetricLogger, best_effort, client, log_metric_rows


def _wait_for(path: Path, thread: threading.Thread) -> None:
    while not path.exists() and thread.is_alive():
        time.sleep(0.2)
    assert path.exists(), f"the stage ended before writing {path.name}"


@pytest.mark.integration
def test_tracking_server_stopped_mid_stage(shards, mlflow_server, tmp_path):
    """Server stopped once step 4's checkpoint is written, started again (same port and backend) once step 8's is:
    training never stops or slows, and the run ends up with every step exactly once."""
    server, steps = mlflow_server, 12
    config = tiny(1, shards, max_steps=steps, checkpoint_every=4)
    outcome: dict = {}
    from jobs.train.driver import run_stage

    def train() -> None:
        try:
            outcome["result"] = run_stage(config, str(tmp_path / "runs"), tracking_uri=server.uri, run_name="outage")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    t_start = time.time()
    thread.start()
    run_dir = tmp_path / "runs" / "outage"
    _wait_for(run_dir / "checkpoint_000004", thread)
    t_stop = time.time()
    t_down = server.stop()
    with sqlite3.connect(server.db) as db:  # what the server stored before it went away (it is down: consistent)
        stored = sorted(s for (s,) in db.execute("select step from metrics where key = 'train/loss'"))
    assert stored and stored == list(range(1, len(stored) + 1)) and stored[-1] < 8, stored
    _wait_for(run_dir / "checkpoint_000008", thread)  # steps go on against a down server
    t_restart = time.time()
    t_up = server.start()
    thread.join()
    assert "error" not in outcome, f"the stage failed: {outcome.get('error')!r}"
    result = outcome["result"]

    assert result.steps == steps and result.unlogged_steps == []
    c = client(server.uri)
    history = c.get_metric_history(result.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, steps + 1))  # every step exactly once
    assert {m.step: m.value for m in history}[steps] == pytest.approx(result.metrics["train/loss"])
    for key in ("train/lr", "train/step_time_s", "train/grad_norm"):
        assert sorted(m.step for m in c.get_metric_history(result.run_id, key)) == list(range(1, steps + 1)), key
    run = c.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == str(steps)
    # Step 8's checkpoint was written while the server was down: it carries exactly the steps not yet stored.
    state8 = json.loads((run_dir / "checkpoint_000008" / "trainer_state.json").read_text())
    assert sorted({row[3] for row in state8["unlogged_metrics"]}) == list(range(stored[-1] + 1, 9))
    per_step = {row[0] for row in state8["unlogged_metrics"]}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/peak_memory_gib"} <= per_step and len(per_step) == 11
    assert len(state8["unlogged_metrics"]) == 11 * (8 - stored[-1])  # all eleven metrics of each of those steps
    final = json.loads((run_dir / "checkpoint_000012" / "trainer_state.json").read_text())
    assert final["unlogged_metrics"] == []  # caught up before the job ended

    # Step-time impact. A step's metrics are stamped when rank 0 queues them, so the gap between two stamps is the
    # step as training lived it; train/step_time_s is its compute alone (it ends before logging). Their difference
    # is what a step spent on anything else: the previous step's logging above all.
    stamps = {m.step: m.timestamp / 1000 for m in history}
    compute = {m.step: m.value for m in c.get_metric_history(result.run_id, "train/step_time_s")}
    gaps = {s: stamps[s] - stamps[s - 1] for s in range(2, steps + 1) if (s - 1) % 4}  # no checkpoint inside
    up = [s for s in gaps if stamps[s] < t_stop]
    down = [s for s in gaps if t_stop < stamps[s - 1] and stamps[s] < t_up]  # stopping, down, restarting
    assert up and down, (gaps, t_stop, t_up)
    overhead = {s: gaps[s] - compute[s] for s in gaps}
    final_state = run_dir / "checkpoint_000012" / "trainer_state.json"
    report = {
        "stored_before_stop": stored[-1],
        "stop_s": round(t_down - t_stop, 1),
        "outage_s": round(t_up - t_down, 1),
        "restart_s": round(t_up - t_restart, 1),
        "steps_trained_after_stop": sum(t_stop < stamp < t_up for stamp in stamps.values()),
        "median_step_s_up": round(statistics.median(gaps[s] for s in up), 3),
        "median_step_s_down": round(statistics.median(gaps[s] for s in down), 3),
        "median_overhead_s_up": round(statistics.median(overhead[s] for s in up), 4),
        "median_overhead_s_down": round(statistics.median(overhead[s] for s in down), 4),
        "max_overhead_s_down": round(max(overhead[s] for s in down), 4),
        # the last step waits (bounded by flush_timeout_s) for buffered metrics before the final checkpoint
        "end_wait_s": round(final_state.stat().st_mtime - stamps[steps], 1),
        "stage_s": round(time.time() - t_start, 1),
    }
    print("tracking outage:", json.dumps(report))
    # A down server costs a step nothing measurable: queueing is a list append. (Before, each step retried three
    # times with 0.5+1+2 s sleeps, and MLflow's own client retried each request for about four minutes.)
    assert statistics.median(overhead[s] for s in down) < 0.5, report


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> str:
        text, self.messages = "\n".join(self.messages), []
        return text


@pytest.fixture()
def tracking_warnings():
    """What jobs.tracking.runs warns about (with or without pytest's logging plugin)."""
    handler, logger = _Messages(), logging.getLogger("jobs.tracking.runs")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_metric_logger_never_blocks_and_reports_what_it_could_not_send(monkeypatch, tracking_warnings):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = MetricLogger(uri, "0" * 32)
    start = time.perf_counter()
    for step in range(1, 101):
        logger.log(step, {"train/loss": 1.0 / step, "train/lr": 1e-3})
    blocked = time.perf_counter() - start
    assert blocked < 0.5, f"100 log() calls against a down server took {blocked:.2f} s"
    missing = logger.close(timeout_s=2)
    assert missing == list(range(1, 101))
    rows = logger.unsent()
    assert len(rows) == 200 and rows[0] == ["train/loss", 1.0, rows[0][2], 1] and rows[-1][3] == 100
    assert f"MLflow run {'0' * 32} is missing metrics of steps 1-100" in tracking_warnings.take()

    # The driver's last try (run_stage, after training): still down → the missing steps, and a warning naming them.
    assert log_metric_rows(uri, "0" * 32, rows) == list(range(1, 101))
    assert "could not log the 200 buffered metrics of run 0000" in tracking_warnings.take()
    # Driver-side calls at the end of a stage never raise: MLflow's HTTP client retries, then a clear warning.
    calls = []
    assert not best_effort("mark run R FINISHED", lambda: calls.append(1) or client(uri).set_terminated("R"))
    assert len(calls) == 1
    assert "MLflow: could not mark run R FINISHED (" in tracking_warnings.take()


def test_metric_logger_resends_what_failed_while_the_server_was_down(mlflow_server, monkeypatch):
    """MLflow's async queue drops a batch it could not send; the logger sends it again once the server is back."""
    from jobs.tracking.runs import start_run

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = mlflow_server
    run_id = start_run(server.uri, "convllava", "resend")
    logger = MetricLogger(server.uri, run_id)
    logger.log(1, {"train/loss": 1.0, "train/lr": 0.1})
    assert logger.close(timeout_s=30) == [] and logger.unsent() == []
    server.stop()
    for step in (2, 3, 4):
        logger.log(step, {"train/loss": float(step), "train/lr": 0.1})
    assert logger.close(timeout_s=3) == [
        2,
        3,
        4,
    ]  # a bounded wait; MLflow reported the batches failed, and dropped them
    assert len(logger.unsent()) == 6
    server.start()
    logger.log(5, {"train/loss": 5.0, "train/lr": 0.1})
    assert logger.close(timeout_s=60) == [] and logger.unsent() == []
    c = client(server.uri)
    for key in ("train/loss", "train/lr"):
        assert sorted(m.step for m in c.get_metric_history(run_id, key)) == [1, 2, 3, 4, 5], key  # each once


def test_metric_logger_sends_requeued_rows_once(tmp_path):
    """A restarted worker re-queues what its checkpoint carried as unsent, minus what the run already has."""
    from jobs.tracking.runs import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(uri, "convllava", "requeue", artifact_location=str(tmp_path / "artifacts"))
    first = MetricLogger(uri, run_id)
    for step in (1, 2, 3):
        first.log(step, {"train/loss": float(step)})
    assert first.close() == []
    second = MetricLogger(uri, run_id)  # the restart: steps 1-3 are in the run
    second.requeue([["train/loss", 2.0, 0, 2], ["train/loss", 4.0, 0, 4]])  # 2 was sent after the checkpoint
    second.log(3, {"train/loss": 3.0})  # a replayed step is not logged twice
    second.log(5, {"train/loss": 5.0})
    assert second.close() == []
    history = sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, "train/loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]

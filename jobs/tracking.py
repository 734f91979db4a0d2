"""MLflow tracking: the driver creates runs; rank 0 of a training job logs metrics into the run it was given.

The embedded default is a SQLite store with an explicit artifact location in the work dir (MLflow's file store
is in maintenance mode, and without an explicit location artifacts would land in ./mlruns).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_tracking_uri(workdir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` when set (a cluster's server), else SQLite in the work dir (the embedded default)."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def artifact_root(tracking_uri: str, workdir: str | Path) -> str | None:
    """Explicit artifact location for local SQLite stores; a server decides its own."""
    return str(Path(workdir).resolve() / "mlartifacts") if tracking_uri.startswith("sqlite:") else None


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses the GenAI one (traces,
# evaluation runs). Ours are model training: the runs table with the pipeline's parent and child runs.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created when missing, tagged as model training unless someone chose another kind."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location,
                                   tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})  # fmt: skip
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def log_dataset(tracking_uri: str, run_id: str, name: str, uri: str, digest: str, profile: dict[str, Any],
                context: str) -> bool:  # fmt: skip
    """Record `uri` (a shard folder, raw annotations; local or `s3://`) as one of the run's inputs: what the runs
    table's Dataset column and the run page show. `digest` is our fingerprint of its content (MLflow keeps 36
    characters), `profile` its counts, `context` its role (`training`, `raw`). Tried like every driver-side call.

    Returns:
        True when it was recorded.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from convllava.storage import is_s3

    dataset = Dataset(name=name, digest=digest[-36:], source_type="s3" if is_s3(uri) else "local",
                      source=json.dumps({"uri": uri}), profile=json.dumps(profile, sort_keys=True))  # fmt: skip
    entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
    return retry_call(f"log dataset {name}", lambda: client(tracking_uri).log_inputs(run_id, datasets=[entry]))


def start_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None, artifact_location: str | None = None) -> str:  # fmt: skip
    """Create a run (child of `parent_run_id` when given) and return its id; the caller ends it."""
    exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client(tracking_uri).create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]  # MLflow's param value limit
    return out


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in flatten(params).items()]
    c = client(tracking_uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


class MetricLogger:
    """Rank 0's metric sink. Training never waits for the tracking server: `log` queues a step's metrics and a
    background thread sends them. A failed send keeps them queued and is retried with backoff (1 s doubling to
    `max_backoff_s`), so an outage only delays metrics; `close` waits (up to `flush_timeout_s`) for the queue to
    drain and returns the steps that never reached the server, which the caller records and reports. Steps already
    in the run (logged before a restart) are not logged twice.

    Keep MLflow's own HTTP retries short in this process (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`/`_TIMEOUT`; run_stage
    sets them for the workers): by default one request retries for about four minutes before it fails."""

    def __init__(self, tracking_uri: str, run_id: str, key: str = "train/loss", max_backoff_s: float = 10.0,
                 flush_timeout_s: float = 60.0) -> None:  # fmt: skip
        self.tracking_uri, self.run_id, self.key = tracking_uri, run_id, key
        self.max_backoff_s, self.flush_timeout_s = max_backoff_s, flush_timeout_s
        self.pending: list = []  # Metric objects not yet stored, oldest first
        self.logged_steps: set[int] = set()
        self.last_step = -1
        self._lock, self._sending = threading.Lock(), threading.Lock()
        self._wake = threading.Event()
        self._closing = self._stopped = False
        try:
            history = client(tracking_uri).get_metric_history(run_id, key)
            self.logged_steps = {m.step for m in history}
            self.last_step = max(self.logged_steps, default=-1)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow unreachable at start (%s); metrics will be buffered", e)
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metric-sender", daemon=True)
        self._thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one step's metrics; returns at once."""
        from mlflow.entities import Metric

        if step <= self.last_step:
            return  # logged before a restart: the resumed run reproduces this step, do not duplicate it
        now = int(time.time() * 1000)
        with self._lock:
            self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.last_step = step
        self._wake.set()

    def unsent(self) -> list[list]:
        """The queued metrics as `[key, value, timestamp, step]` rows (JSON), for a checkpoint to carry."""
        with self._lock:
            return [[m.key, m.value, m.timestamp, m.step] for m in self.pending]

    def requeue(self, rows: list[list]) -> None:
        """Queue metrics a checkpoint carried as unsent (see `unsent`), except steps the run already has."""
        from mlflow.entities import Metric

        with self._lock:
            self.pending[:0] = [Metric(k, v, t, s) for k, v, t, s in rows if s not in self.logged_steps]
        self._wake.set()

    def unsent_steps(self) -> list[int]:
        with self._lock:
            return sorted({m.step for m in self.pending})

    def flush(self) -> bool:
        """Send everything queued; False (the metrics stay queued) when the server cannot be reached."""
        with self._sending:  # one sender at a time: a batch is removed from the queue by the one who sent it
            try:
                c = client(self.tracking_uri)
                while True:
                    with self._lock:
                        batch = self.pending[:500]
                    if not batch:
                        return True
                    c.log_batch(self.run_id, metrics=batch)
                    with self._lock:  # drop each batch once it is stored, so a retry never re-sends it
                        del self.pending[: len(batch)]
                        self.logged_steps.update(m.step for m in batch)
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                log.warning("MLflow log_batch failed (%d metrics queued, steps %s): %s", len(self.pending),
                            _ranges(self.unsent_steps()), e)  # fmt: skip
                return False

    def _send_loop(self) -> None:
        delay = None  # None: wait until `log` queues something
        while not self._stopped:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopped:
                return
            if self.flush():
                if self._closing:
                    return
                delay = None
            else:
                delay = min(self.max_backoff_s, 2 * delay if delay else 1.0)
                delay = min(delay, 1.0) if self._closing else delay

    def log_text(self, text: str, name: str) -> None:
        """An artifact text file of the run; tried once (a down server costs one warning, never training time)."""
        retry_call(f"log {name}", lambda: client(self.tracking_uri).log_text(self.run_id, text, name), attempts=1)

    def close(self, timeout_s: float | None = None) -> list[int]:
        """Wait up to `timeout_s` (default `flush_timeout_s`) for the queue to drain, then stop the sender.

        Returns:
            The steps whose metrics never reached the server (empty when all did); they stay in `pending`.
        """
        self._closing = True
        self._wake.set()
        self._thread.join(self.flush_timeout_s if timeout_s is None else timeout_s)
        self._stopped = True
        self._wake.set()
        # A request still in flight after this is harmless: the caller re-sends what is reported unsent, and MLflow
        # stores an identical metric (key, value, timestamp, step) once.
        self._thread.join(5.0)
        missing = self.unsent_steps()
        if missing:
            log.error("MLflow run %s is missing metrics of steps %s: the tracking server at %s was unreachable",
                      self.run_id, _ranges(missing), self.tracking_uri)  # fmt: skip
        return missing


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] → '1-3,7': a readable list of (many) step numbers."""
    out: list[str] = []
    for s in steps:
        if out and int(out[-1].split("-")[-1]) == s - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ",".join(out)


def retry_call(what: str, fn: Callable[[], Any], attempts: int = 3, wait_s: float = 2.0) -> bool:
    """A driver-side MLflow call that must not fail a job whose training is done: tried `attempts` times with
    backoff (each try is itself retried by MLflow's HTTP client), then a warning naming what was not recorded.

    Returns:
        True when the call succeeded.
    """
    for attempt in range(attempts):
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - the training result is worth more than its record
            if attempt + 1 == attempts:
                log.warning("MLflow: could not %s after %d attempts (%s); the job goes on without it", what,
                            attempts, e)  # fmt: skip
                return False
            time.sleep(wait_s * 2**attempt)
    return False


def log_metric_rows(tracking_uri: str, run_id: str, rows: list[list]) -> list[int]:
    """Send `[key, value, timestamp, step]` rows that rank 0 could not (see `MetricLogger.unsent`).

    Returns:
        The steps still missing from the run (empty when everything was sent).
    """
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
    for i in range(0, len(metrics), 500):
        batch = metrics[i : i + 500]
        if not retry_call(f"log the {len(metrics)} buffered metrics of run {run_id}",
                          lambda b=batch: client(tracking_uri).log_batch(run_id, metrics=b)):  # fmt: skip
            return sorted({m.step for m in metrics[i:]})
    return []

"""MLflow tracking: the driver creates runs; rank 0 of a training job logs metrics into the run it was given.

The embedded default is a SQLite store with an explicit artifact location in the work dir (MLflow's file store
is in maintenance mode, and without an explicit location artifacts would land in ./mlruns).
"""

from __future__ import annotations

import logging
import time
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


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location)


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
    """Rank 0's metric sink. Steps already in the run (logged before a restart) are not logged twice;
    failed writes are retried, kept in a buffer and sent with the next successful write, so an unreachable
    tracking server never stops training."""

    def __init__(self, tracking_uri: str, run_id: str, key: str = "train/loss", retries: int = 3) -> None:
        self.tracking_uri, self.run_id, self.retries = tracking_uri, run_id, retries
        self.pending: list = []
        self.last_step = -1
        try:
            history = client(tracking_uri).get_metric_history(run_id, key)
            self.last_step = max((m.step for m in history), default=-1)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow unreachable at start (%s); metrics will be buffered", e)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return  # logged before a restart: the resumed run reproduces this step, do not duplicate it
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self.last_step = step
        self.flush()

    def flush(self) -> bool:
        for attempt in range(self.retries):
            try:
                c = client(self.tracking_uri)
                while self.pending:  # drop each batch once it is stored, so a retry never re-sends it
                    c.log_batch(self.run_id, metrics=self.pending[:500])
                    self.pending = self.pending[500:]
                return True
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow log_batch failed (attempt %d/%d): %s", attempt + 1, self.retries, e)
                time.sleep(0.5 * 2**attempt)
        return False

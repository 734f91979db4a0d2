"""MLflow tracking: the driver creates runs; rank 0 of a training job logs metrics into the run it was given.

The embedded default is a SQLite store with an explicit artifact location in the work dir (MLflow's file store
is in maintenance mode, and without an explicit location artifacts would land in ./mlruns).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.tracking.vocabulary import (
    DATASET_CONTEXT_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    TAG_PARENT_RUN,
    TRAIN_LOSS,
)

log = logging.getLogger(__name__)


def default_tracking_uri(workdir: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` when set (a cluster's server), else SQLite in the work dir (the embedded default)."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Explicit artifact location for a local SQLite store: `mlartifacts` beside its database file (WORKDIR/mlartifacts
    for the embedded default). Without one, MLflow puts artifacts in ./mlruns of whatever the current directory is.
    None for a server, which decides its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return str(Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts")


@contextlib.contextmanager
def using_tracking_uri(uri: str):
    """MLflow's global tracking URI for the calls that read it (the fluent API; the registry resolving a `models:/`
    source), restored after them. MLflow's setter also exports it as MLFLOW_TRACKING_URI, which `default_tracking_uri`
    honours: left set, the next pipeline in this process (another work dir) would record into this one's store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the global and the variable


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# MLflow 3's UI opens an experiment in the view its kind names (EXPERIMENT_KIND_TAG); without the tag it guesses the
# GenAI one (traces, evaluation runs). Ours are model training: the runs table with the pipeline's parent and child runs.


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created when missing (artifacts in `artifact_location`, by default `artifact_root`'s),
    tagged as model training unless someone chose another kind."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = artifact_location or artifact_root(tracking_uri)
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def log_dataset(
    tracking_uri: str, run_id: str, name: str, uri: str, digest: str, profile: dict[str, Any], context: str
) -> bool:
    """Record `uri` (a shard folder, raw annotations; local or `s3://`) as one of the run's inputs: what the runs
    table's Dataset column and the run page show. `digest` is our fingerprint of its content (MLflow keeps 36
    characters), `profile` its counts, `context` its role (`training`, `raw`). Tried like every driver-side call.

    Returns:
        True when it was recorded.
    """
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from convllava.io.storage import is_s3

    dataset = Dataset(
        name=name,
        digest=digest[-36:],
        source_type="s3" if is_s3(uri) else "local",
        source=json.dumps({"uri": uri}),
        profile=json.dumps(profile, sort_keys=True),
    )
    entry = DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, context)])
    return best_effort(f"log dataset {name}", lambda: client(tracking_uri).log_inputs(run_id, datasets=[entry]))


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """Create a run (child of `parent_run_id` when given) and return its id; the caller ends it."""
    exp_id = ensure_experiment(tracking_uri, experiment, artifact_location)
    tags = dict(tags or {})
    if parent_run_id:
        tags[TAG_PARENT_RUN] = parent_run_id
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
    """Rank 0's metric sink on MLflow's asynchronous logging: `log` hands a step's metrics to MLflow's queue
    (`log_batch(..., synchronous=False)`) and returns at once; MLflow's threads send them. Steps already in the run
    (logged before a restart) are not logged twice.

    Added here is what MLflow lacks. Its queue drops a batch that failed: the logger sends it again (MLflow stores an
    identical metric once, so that is never a duplicate). Its flush waits without limit: `close` waits up to
    `flush_timeout_s`. Keep MLflow's HTTP retries short in this process (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`/`_TIMEOUT`;
    run_stage sets them for the workers), and leave `MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS` unset: MLflow then
    merges batches and reports a failed merge on its first batch only."""

    def __init__(self, tracking_uri: str, run_id: str, key: str = TRAIN_LOSS, flush_timeout_s: float = 60.0) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.flush_timeout_s = flush_timeout_s
        self.sent: list[tuple[list, list]] = []  # (metrics, MLflow's futures for them) not known to be stored
        self.logged_steps: set[int] = set()
        self.last_step = -1
        # Opening the store (a SQLite store checks its schema: ~2 s) and reading the logged steps happen while the
        # model builds; every method waits for them.
        self._error: BaseException | None = None
        self._connecting = threading.Thread(
            target=self._connect, args=(key,), name="convllava-mlflow-connect", daemon=True
        )
        self._connecting.start()

    def _connect(self, key: str) -> None:
        try:
            self.client = client(self.tracking_uri)
        except BaseException as e:  # noqa: BLE001 - raised by the first call that needs the client
            self._error = e
            return
        try:
            self.logged_steps = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("MLflow unreachable at start (%s); metrics will be buffered", e)
        self.last_step = max(self.logged_steps, default=-1)

    def _connected(self) -> None:
        self._connecting.join()
        if self._error is not None:
            raise self._error

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queue one step's metrics; returns at once."""
        from mlflow.entities import Metric

        self._connected()
        if step <= self.last_step:
            return  # logged before a restart: the resumed run reproduces this step, do not duplicate it
        now = int(time.time() * 1000)
        self._send([Metric(k, float(v), now, step) for k, v in metrics.items()])
        self.last_step = step
        self._settle()

    def rewind(self, step: int) -> None:
        """Log the steps after `step` again: the resumed run trains them another way (at another world size). MLflow
        keeps the earlier attempt's values beside the new ones (it cannot delete a metric); the later timestamp
        marks the kept one, and the run's `convllava.resize.*` tag says where it happened."""
        self._connected()
        self.last_step = min(self.last_step, step)
        self.logged_steps = {s for s in self.logged_steps if s <= step}

    def unsent(self) -> list[list]:
        """The metrics not known to be stored, as `[key, value, timestamp, step]` rows (JSON) for a checkpoint."""
        self._connected()
        self._settle()
        metrics = sorted((m for batch, _ in self.sent for m in batch), key=lambda m: m.step)
        return [[m.key, m.value, m.timestamp, m.step] for m in metrics]

    def requeue(self, rows: list[list]) -> None:
        """Send metrics a checkpoint carried as unsent (see `unsent`), except steps the run already has."""
        from mlflow.entities import Metric

        self._connected()
        self._send([Metric(k, v, t, s) for k, v, t, s in rows if s not in self.logged_steps])

    def log_text(self, text: str, name: str) -> None:
        """An artifact text file of the run; a down server costs one warning, never training time."""
        self._connected()
        best_effort(f"log {name}", lambda: self.client.log_text(self.run_id, text, name))

    def set_tag(self, key: str, value: str) -> None:
        """A tag of the run (an event such as a resize); a down server costs one warning, never training time."""
        self._connected()
        best_effort(f"tag {key}", lambda: self.client.set_tag(self.run_id, key, value))

    def close(self, timeout_s: float | None = None) -> list[int]:
        """Wait up to `timeout_s` (default `flush_timeout_s`) for every metric to be stored.

        Returns:
            The steps whose metrics never reached the server (empty when all did); `unsent` still has them.
        """
        from concurrent.futures import FIRST_EXCEPTION, wait

        self._connected()
        deadline = time.monotonic() + (self.flush_timeout_s if timeout_s is None else timeout_s)
        while self.sent and (left := deadline - time.monotonic()) > 0:
            wait([f for _, futures in self.sent for f in futures], timeout=left, return_when=FIRST_EXCEPTION)
            if self._settle():
                time.sleep(min(1.0, left))  # a server that refuses at once is asked again once a second
        missing = sorted({row[3] for row in self.unsent()})
        if missing:
            log.error(
                "MLflow run %s is missing metrics of steps %s: the tracking server at %s was unreachable",
                self.run_id,
                _ranges(missing),
                self.tracking_uri,
            )
        return missing

    def _send(self, metrics: list) -> None:
        from jobs.private_apis import operation_futures

        if metrics:
            operations = self.client.log_batch(self.run_id, metrics=metrics, synchronous=False)
            self.sent.append((metrics, operation_futures(operations)))  # RunOperations.wait() would block

    def _settle(self) -> int:
        """Forget the batches MLflow stored; send those it reports failed again, as one batch.

        Returns:
            How many metrics were sent again.
        """
        failed, pending = [], []
        for metrics, futures in self.sent:
            if not all(f.done() for f in futures):
                pending.append((metrics, futures))
            elif any(f.exception() is not None for f in futures):
                failed += metrics
            else:
                self.logged_steps.update(m.step for m in metrics)
        self.sent = pending
        self._send(failed)
        return len(failed)


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] → '1-3,7': a readable list of (many) step numbers."""
    out: list[str] = []
    for s in steps:
        if out and int(out[-1].split("-")[-1]) == s - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ",".join(out)


def best_effort(what: str, fn: Callable[[], Any]) -> bool:
    """A tracking call that must not fail a job: MLflow's HTTP client retries the request
    (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `_BACKOFF_FACTOR`, `_TIMEOUT`); if it still fails, a warning names what was
    not recorded.

    Returns:
        True when the call succeeded.
    """
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - the training result is worth more than its record
        log.warning("MLflow: could not %s (%s); the job goes on without it", what, e)
        return False


def log_metric_rows(tracking_uri: str, run_id: str, rows: list[list]) -> list[int]:
    """Send `[key, value, timestamp, step]` rows that rank 0 could not (see `MetricLogger.unsent`).

    Returns:
        The steps still missing from the run (empty when everything was sent).
    """
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
    sent = best_effort(
        f"log the {len(metrics)} buffered metrics of run {run_id}",
        lambda: client(tracking_uri).log_batch(run_id, metrics=metrics),
    )
    return [] if sent else sorted({m.step for m in metrics})

"""Every use of a private (underscore) API of Ray Train or MLflow, in one place.

Each function or class below says which private thing it touches, why no public API does the job, and the version it
was checked against. `tests/unit/test_private_apis.py` fails when one of them changes (a module or attribute gone, a
signature changed, a value of another type), and checks that no other module of ours reaches for `_internal` or
`_operation_futures`. On an upgrade of Ray or MLflow: run those tests, then look again for a public replacement.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback

RAY_CHECKED = "2.60.0"
MLFLOW_CHECKED = "3.17.2"


def quiet_train_report_log() -> None:
    """Raise Ray Train's per-report INFO line ("Reporting training result N ... from rank R", one per checkpoint and
    rank) to WARNING in this worker.

    Touches: the module logger of `ray.train.v2._internal.execution.context`, which Ray names by the module's file
    path (`logging.getLogger(__file__)`).
    No public API: `RunConfig(logging_config=LoggingConfig(...))` filters the handlers of the `ray.train` logger, and
    a logger named by a file path is not under it; its name is the private module's path.
    Checked against Ray 2.60.0.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class StageTrainer(TorchTrainer):
    """A `TorchTrainer` that starts no Ray Data dataset manager when it is given no Ray datasets.

    Ray Train's `DatasetsCallback` starts one more actor process per run (about 1.5 s of CPU, while the workers
    import) to hand out shards of the trainer's `datasets`; a stage reads its Parquet shards itself (`ShardSet`) and
    passes none. With datasets it is the plain `TorchTrainer`.

    Touches: `DataParallelTrainer._create_default_callbacks` (overridden) and
    `ray.train.v2._internal.callbacks.DatasetsCallback` (the class left out).
    No public API: `RunConfig(callbacks=...)` adds callbacks but cannot remove a default one, and no setting turns the
    dataset callback off.
    Checked against Ray 2.60.0.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def operation_futures(operations: Any) -> list[Future]:
    """The futures of one asynchronous MLflow call (`MlflowClient.log_batch(..., synchronous=False)`), one per queued
    operation: each is done once MLflow stored it or gave up (then its `exception()` says why).

    Touches: `mlflow.utils.async_logging.run_operations.RunOperations._operation_futures`.
    No public API: `RunOperations.wait()` is its only public method, and it blocks until every operation is done
    (rank 0 must never wait on the tracking server; `MetricLogger` polls `done()` instead). Waiting in a thread of
    our own would keep that thread blocked on a server that is down, and hold up the process's exit.
    Checked against MLflow 3.17.2.
    """
    return operations._operation_futures

"""The private Ray Train and MLflow APIs we use (`jobs.private_apis`) still behave as we rely on, and nothing else of
ours uses them: each test fails when an upgrade changes the private thing (gone, renamed, another signature or type)."""

from __future__ import annotations

import inspect
import logging
import re
from concurrent.futures import Future, wait
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ADAPTER = ROOT / "jobs" / "private_apis.py"
PRIVATE = re.compile(r"\b_internal\b|_operation_futures|_create_default_callbacks")


def test_no_module_but_the_adapter_uses_a_private_ray_or_mlflow_api():
    users = sorted(
        str(path.relative_to(ROOT))
        for package in ("jobs", "pipelines", "convllava")
        for path in (ROOT / package).rglob("*.py")
        if path != ADAPTER and PRIVATE.search(path.read_text())
    )
    assert users == [], f"{users} use private Ray/MLflow APIs: go through jobs/private_apis.py"
    assert PRIVATE.search(ADAPTER.read_text())  # the pattern finds what it is meant to find


def test_the_train_report_line_is_logged_by_the_logger_we_quiet():
    from ray.train.v2._internal.execution import context

    from jobs.private_apis import quiet_train_report_log

    logger = logging.getLogger(context.__file__)
    before = logger.level
    try:
        quiet_train_report_log()
        # The module's own logger is the one raised to WARNING, and it still writes the per-report INFO line.
        assert context.logger is logger and logger.level == logging.WARNING
        assert "Reporting training result" in inspect.getsource(context)
    finally:
        logger.setLevel(before)


def test_stage_trainer_starts_no_dataset_manager_without_ray_datasets():
    """A stage reads its shards itself: Ray Train's dataset callback (one more actor process per stage) is left out,
    and kept for a trainer given Ray datasets; every other default callback stays."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.private_apis import StageTrainer

    assert list(inspect.signature(TorchTrainer._create_default_callbacks).parameters) == ["self"]
    scaling = ray.train.ScalingConfig(num_workers=1)

    def names(trainer) -> list[str]:
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    plain = names(TorchTrainer(lambda: None, scaling_config=scaling))
    assert "DatasetsCallback" in plain and "BackendSetupCallback" in plain
    ours = names(StageTrainer(lambda: None, scaling_config=scaling))
    assert ours == [n for n in plain if n != "DatasetsCallback"]
    assert names(StageTrainer(lambda: None, scaling_config=scaling, datasets={"train": lambda: None})) == plain


@pytest.fixture()
def mlflow_run(tmp_path):
    from jobs.tracking.runs import client, start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return client(uri), start_run(uri, "private-apis", "run")


def test_an_async_log_batch_gives_futures_that_complete_once_stored(mlflow_run):
    from mlflow.entities import Metric

    from jobs.private_apis import operation_futures

    c, run_id = mlflow_run
    assert "synchronous" in inspect.signature(c.log_batch).parameters
    metrics = [Metric("train/loss", 2.0 - step / 10, 1_000 + step, step) for step in range(1, 6)]
    operations = c.log_batch(run_id, metrics=metrics, synchronous=False)
    futures = operation_futures(operations)
    assert isinstance(futures, list) and futures and all(isinstance(f, Future) for f in futures)
    done, pending = wait(futures, timeout=60)
    assert not pending and all(f.exception() is None for f in done)
    history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train/loss"))
    assert history == [(step, 2.0 - step / 10) for step in range(1, 6)]


def test_an_async_log_batch_that_fails_says_so_in_its_futures(mlflow_run):
    """`MetricLogger` sends a batch again when one of its futures ends with an exception."""
    from mlflow.entities import Metric

    from jobs.private_apis import operation_futures

    c, run_id = mlflow_run
    c.delete_run(run_id)  # a deleted run accepts no metrics
    futures = operation_futures(c.log_batch(run_id, metrics=[Metric("train/loss", 1.0, 1_000, 1)], synchronous=False))
    done, pending = wait(futures, timeout=60)
    assert not pending and any(f.exception() is not None for f in done)

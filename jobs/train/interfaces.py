"""The recipe's boundary with whoever runs it: the sinks it hands checkpoints and metrics to, and the StageResult a
runner returns. Ray Train's implementations are in `jobs.train.driver`, the local ones in `jobs.train.local`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class StageResult:
    """What a finished stage hands on, however it ran (Ray Train or local processes)."""

    name: str
    checkpoint_uri: str  # the whole checkpoint (DeepSpeed state + model), for resuming
    model_uri: str  # the consolidated Hugging Face-format model: what the next stage initialises from
    steps: int
    metrics: dict[str, float]
    run_id: str | None
    unlogged_steps: list[int] = field(default_factory=list)  # steps whose metrics MLflow never stored
    resumed_from: int = 0  # the step this run started at (0: from the beginning)


class CheckpointSink(Protocol):
    """Where a finished checkpoint goes. `publish` is called on every rank with that rank's folder (its part written
    and its completion marker last); the folder is deleted after. Ray Train's sink reports it to the controller,
    which uploads it; a local sink copies it under the run's folder."""

    def publish(self, directory: Path, step: int, metrics: dict[str, float]) -> None: ...


class MetricSink(Protocol):
    """Rank 0's metrics and events (`set_tag`: a resize, for one). `log` must not block training and skips steps the
    run already has (a resumed run reproduces them); `rewind(step)`: the steps after `step` are trained again in
    another way (an elastic stage resumed at another size), so log them again beside the earlier values; `unsent`
    are `[key, value, timestamp, step]` rows not yet stored (a checkpoint carries them), `requeue` takes such rows
    back after a restart; `close` flushes."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def rewind(self, step: int) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def set_tag(self, key: str, value: str) -> None: ...

    def unsent(self) -> list[list]: ...

    def requeue(self, rows: list[list]) -> None: ...

    def close(self) -> Any: ...

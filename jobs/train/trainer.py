"""The stage's Ray Train trainer: `TorchTrainer` without the parts a stage never uses."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback


class StageTrainer(TorchTrainer):
    """A `TorchTrainer` that starts no Ray Data dataset manager when it is given no Ray datasets.

    Ray Train's `DatasetsCallback` starts one more actor process per run (about 1.5 s of CPU, while the workers
    import) to hand out shards of the trainer's `datasets`; a stage reads its Parquet shards itself (`ShardSet`) and
    passes none. With datasets it is the plain `TorchTrainer`.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

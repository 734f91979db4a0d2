"""The pipeline configuration: data sets, preprocessing, the training stages in order, the eval suite, the gate.

`stages` is an ordered mapping of any names (ConvLLaVA's three stages, LLaVA's pretrain → finetune, a lab's own):
the DAG's nodes are `preprocess`, the stages in the order written, then `eval`. Each stage starts from the previous
stage's model unless it sets `init_from`: a checkpoint path, an `s3://` URI, or a registered model version
(`models:/NAME/VERSION` or `models:/NAME@ALIAS`). Paths: `stages.*.config` are relative to jobs/configs; dataset
source paths are relative to `data_root` (default: WORKDIR/data, where `demo_data` is generated when set).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, PrivateAttr, model_validator

from convllava.io.config import (
    ConfigLoadError,
    ConfigModel,
    Overrides,
    load_yaml_mapping,
    parse_overrides,
    stable_hash,
)
from convllava.io.storage import is_s3
from jobs.evaluate.suite import fixed_metric_names, load_suite
from jobs.tracking.registry import REGISTERED_VERSION
from jobs.train.config import CONFIG_DIR, StageConfig
from pipelines.config import Mixture, PreprocessConfig
from pipelines.demo.data import DemoDataConfig

FIRST_NODE, LAST_NODE = "preprocess", "eval"  # around the stages, whatever they are
STAGE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$")  # names runs, run folders and MLflow child runs
ModelMode = Literal["copy", "reference"]
MODEL_MODES: tuple[str, ...] = get_args(ModelMode)


class StageSpec(ConfigModel):
    """A stage node: its stage YAML (relative to jobs/configs), the data set it trains on, overrides of the YAML
    (`key: value`, dotted keys as on the command line), and where it starts: the previous stage's model unless
    `init_from` names a checkpoint (path or `s3://`) or a registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`)."""

    config: str
    data: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None


class EvalSpec(ConfigModel):
    """The eval node: a suite (name or YAML), at most `limit` questions per benchmark, and the suite's data root
    (default: the pipeline's data root)."""

    suite: str
    limit: int | None = None
    max_new_tokens: int = 32
    data_root: str | None = None

    def key(self) -> dict[str, Any]:
        """The fields that are set, for the eval node's key: a field left unset does not change a finished node's."""
        return {k: v for k, v in self.to_dict().items() if v is not None}


class PipelineConfig(ConfigModel):
    name: str
    registered_model: str
    datasets: dict[str, Mixture]
    stages: dict[str, StageSpec]
    eval: EvalSpec
    primary_metric: str
    higher_is_better: bool = True
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    demo_data: DemoDataConfig | None = None
    data_root: str | None = None
    storage: str | None = None
    init_from_champion: bool = False
    model_mode: ModelMode = "copy"  # the registered MLflow model holds the checkpoint (copy) or its URI (reference)
    _source_path: str = PrivateAttr(default="")  # the YAML it came from, for the errors raised after loading

    @property
    def source_path(self) -> str:
        return self._source_path

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        # Messages leave out the file: the loader puts it (and the field path, when there is one) in front.
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        for name, spec in self.stages.items():
            if name in (FIRST_NODE, LAST_NODE) or not STAGE_NAME.match(name):
                raise ValueError(
                    f"stages.{name}: a stage name is a letter then letters, digits, '-' or '_' "
                    f"(at most 40), and neither {FIRST_NODE!r} nor {LAST_NODE!r}"
                )
            if spec.init_from is not None and spec.init_from.startswith("models:"):
                if not REGISTERED_VERSION.match(spec.init_from):
                    raise ValueError(
                        f"stages.{name}.init_from: a registered model is models:/NAME/VERSION or "
                        f"models:/NAME@ALIAS, got {spec.init_from!r}"
                    )
            elif spec.init_from is not None and not spec.init_from.strip():
                raise ValueError(f"stages.{name}.init_from: empty; leave it out instead")
            if spec.data not in self.datasets:
                raise ValueError(
                    f"stages.{name}.data: unknown dataset {spec.data!r}; datasets are {sorted(self.datasets)}"
                )
            if not (CONFIG_DIR / spec.config).is_file():
                raise ValueError(f"stages.{name}.config: {CONFIG_DIR / spec.config} not found")
        if self.data_root and is_s3(self.data_root):
            if self.demo_data:
                raise ValueError(
                    f"demo_data is generated into data_root, which must then be a local folder, not {self.data_root}"
                )
            if not self.eval.data_root:
                raise ValueError(
                    f"eval.data_root: the eval suite's files are read from a local folder (a shared "
                    f"volume on a cluster); with data_root {self.data_root} on S3, name that folder"
                )
        self._check_primary_metric()
        return self

    def _check_primary_metric(self) -> None:
        """The gate's metric must be one the eval suite reports: a typo fails here, not after three stages."""
        try:
            suite, benches = load_suite(self.eval.suite, self.eval.data_root)
        except ValueError as e:
            raise ValueError(f"eval.suite: {e}") from None
        offered = fixed_metric_names(benches)
        bench, _, rest = self.primary_metric.partition("/")
        per_group = "/" in rest and bench in {b.name for b in benches}  # e.g. mme/<subtask>/score: the data decides
        if self.primary_metric not in offered and not per_group:
            raise ValueError(
                f"primary_metric: {self.primary_metric!r} is not reported by eval.suite {suite!r}; "
                f"it reports {offered}, plus BENCHMARK/GROUP/METRIC per subtask or question type in its data"
            )

    @property
    def nodes(self) -> tuple[str, ...]:
        """The DAG in order: preprocess, the stages as written, eval."""
        return (FIRST_NODE, *self.stages, LAST_NODE)

    def node(self, name: str) -> int:
        """The position of node `name` (for `--from`); a name that is not a node is refused, naming the nodes."""
        if name not in self.nodes:
            raise ConfigLoadError(
                f"{self.source_path}: --from {name}: not a node of pipeline {self.name!r}; its nodes are "
                f"{', '.join(self.nodes)}"
            )
        return self.nodes.index(name)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Overrides | None = None) -> PipelineConfig:
        config = cls.from_dict(load_yaml_mapping(path), str(path), overrides)
        config._source_path = str(path)
        return config

    def config_hash(self) -> str:
        """The configuration's hash; the stages' order is part of it (keys are sorted, the order is added)."""
        return stable_hash({**self.to_dict(), "stage_order": list(self.stages)})

    def preprocess_config(self) -> PreprocessConfig:
        return self.preprocess

    def mixture(self, dataset: str, data_root: Path | str) -> Mixture:
        """The data set's sources with relative paths under `data_root`."""
        return self.datasets[dataset].resolved(data_root)

    def stage_config(self, node: str, data: str, init_from: str | None, extra: list[str] | None = None) -> StageConfig:
        """The node's stage YAML with the pipeline's overrides, then `extra` (`key=value`), then the node's name, the
        data and the checkpoint the DAG hands it."""
        spec = self.stages[node]
        where = f"{self.source_path}: stages.{node}.overrides"
        try:
            given = parse_overrides(extra or [])
        except ConfigLoadError as e:
            raise ConfigLoadError(f"{where}: {e}") from None
        overrides = {**spec.overrides, **given, "name": node, "data": data}
        if init_from is not None:
            overrides["init_from"] = init_from
        return StageConfig.from_yaml(CONFIG_DIR / spec.config).with_overrides(overrides, where)

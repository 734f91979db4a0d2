"""The pipeline configuration: data sets, preprocessing, the three stage configs, the eval suite, the model gate.

Paths: `stages.*.config` are relative to jobs/configs; dataset source paths are relative to `data_root`
(default: WORKDIR/data, where `demo_data` is generated when set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.evaluate import fixed_metric_names, load_suite
from jobs.stage_config import CONFIG_DIR, StageConfig, parse_overrides
from pipelines.config import Mixture, PreprocessConfig, Source, load_yaml_mapping

NODES = ("preprocess", "stage1", "stage2", "stage3", "eval")


class PipelineConfigError(ValueError):
    """A pipeline configuration key or value that is not accepted; the message names it."""


@dataclass(frozen=True)
class StageSpec:
    config: str
    data: str
    overrides: dict[str, Any] = field(default_factory=dict)


MODEL_MODES = ("copy", "reference")


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    registered_model: str
    datasets: dict[str, dict[str, Any]]
    stages: dict[str, StageSpec]
    eval: dict[str, Any]
    primary_metric: str
    higher_is_better: bool = True
    preprocess: dict[str, Any] = field(default_factory=dict)
    demo_data: dict[str, Any] | None = None
    data_root: str | None = None
    storage: str | None = None
    init_from_champion: bool = False
    model_mode: str = "copy"  # the registered MLflow model holds the checkpoint (copy) or its URI (reference)
    source_path: str = ""

    def __post_init__(self) -> None:
        if self.model_mode not in MODEL_MODES:
            raise PipelineConfigError(f"{self.source_path}: model_mode must be one of {MODEL_MODES}, "
                                      f"got {self.model_mode!r}")  # fmt: skip
        if set(self.stages) != {"stage1", "stage2", "stage3"}:
            raise PipelineConfigError(
                f"{self.source_path}: stages must be stage1, stage2 and stage3, got {sorted(self.stages)}"
            )
        for name, spec in self.stages.items():
            if spec.data not in self.datasets:
                raise PipelineConfigError(f"{self.source_path}: stages.{name}.data: unknown dataset {spec.data!r}; "
                                          f"datasets are {sorted(self.datasets)}")  # fmt: skip
            if not (CONFIG_DIR / spec.config).is_file():
                raise PipelineConfigError(
                    f"{self.source_path}: stages.{name}.config: {CONFIG_DIR / spec.config} not found"
                )
        PreprocessConfig.from_dict(self.preprocess, where=f"{self.source_path}: preprocess")
        if "suite" not in self.eval:
            raise PipelineConfigError(f"{self.source_path}: eval.suite is required")
        unknown = sorted(set(self.eval) - {"suite", "limit", "max_new_tokens", "data_root"})
        if unknown:
            raise PipelineConfigError(f"{self.source_path}: eval: unknown key(s) {unknown}")
        self._check_primary_metric()

    def _check_primary_metric(self) -> None:
        """The gate's metric must be one the eval suite reports: a typo fails here, not after three stages."""
        try:
            suite, benches = load_suite(self.eval["suite"], self.eval.get("data_root"))
        except ValueError as e:
            raise PipelineConfigError(f"{self.source_path}: eval.suite: {e}") from None
        offered = fixed_metric_names(benches)
        bench, _, rest = self.primary_metric.partition("/")
        per_group = "/" in rest and bench in {b.name for b in benches}  # e.g. mme/<subtask>/score: the data decides
        if self.primary_metric not in offered and not per_group:
            raise PipelineConfigError(
                f"{self.source_path}: primary_metric: {self.primary_metric!r} is not reported by eval.suite {suite!r}; "
                f"it reports {offered}, plus BENCHMARK/GROUP/METRIC per subtask or question type in its data"
            )

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineConfig:
        raw = load_yaml_mapping(path, PipelineConfigError)
        known = {f.name for f in dataclasses.fields(cls)} - {"source_path"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PipelineConfigError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        stages = {}
        for name, spec in (raw.get("stages") or {}).items():
            bad = sorted(set(spec) - {"config", "data", "overrides"})
            if bad:
                raise PipelineConfigError(f"{path}: stages.{name}: unknown key(s) {bad}")
            stages[name] = StageSpec(spec["config"], spec["data"], spec.get("overrides") or {})
        missing = sorted({"name", "registered_model", "datasets", "eval", "primary_metric"} - set(raw))
        if missing:
            raise PipelineConfigError(f"{path}: missing key(s) {missing}")
        return cls(**{**raw, "stages": stages, "source_path": str(path)})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source_path")
        return d

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def mixture(self, dataset: str, data_root: Path) -> Mixture:
        spec = self.datasets[dataset]
        sources = []
        for raw in spec.get("sources") or []:
            s = dict(raw)
            for key in ("annotations", "image_root"):
                if not str(s[key]).startswith("s3://") and not Path(s[key]).is_absolute():
                    s[key] = str((data_root / s[key]).resolve())
            sources.append(Source(**s))
        if not sources:
            raise PipelineConfigError(f"{self.source_path}: datasets.{dataset}: no sources")
        return Mixture(tuple(sources))

    def stage_config(self, node: str, data: str, init_from: str | None, extra: list[str] | None = None) -> StageConfig:
        spec = self.stages[node]
        overrides = {**spec.overrides, **parse_overrides(extra or []), "data": data}
        if init_from is not None:
            overrides["init_from"] = init_from
        config = StageConfig.from_yaml(CONFIG_DIR / spec.config)
        return config.replace(**overrides)

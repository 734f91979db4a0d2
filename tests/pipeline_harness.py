"""A small pipeline config (the demo's DAG on a few dozen samples, a few steps a stage) and its runs in MLflow."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

import jobs.train.preflight
from jobs.tracking.runs import client
from jobs.tracking.vocabulary import ARTIFACT_STAGE_CONFIG

ROOT = Path(__file__).resolve().parents[1]
NODES = ["preprocess", "stage1", "stage2", "stage3", "eval"]


def pipeline_cli(config: Path, workdir: Path, command: str = "pipeline run") -> list[str]:
    """The `convllava` command line that runs (or retrains) `config` in `workdir`, as a user types it."""
    exe = str(Path(sys.executable).parent / "convllava")
    return [exe, *command.split(), "--config", str(config), "--workdir", str(workdir)]


def small_config(path: Path, name: str, steps: int = 2, checkpoint_every: int = 0, epochs: int = 1) -> Path:
    config = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    config.update(name=name, registered_model=f"{name}-model")
    config["demo_data"] = {"seed": 0, "captions": 48, "instruct": 48, "eval": 6}
    for stage in config["stages"].values():
        stage["overrides"] = {"max_steps": steps, "checkpoint_every": checkpoint_every, "epochs": epochs}
    config["eval"] = {"suite": "demo", "max_new_tokens": 4}
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_variant(shipped: Path, path: Path, name: str, steps: int = 2) -> Path:
    """A shipped full-scale pipeline config on the tiny preset and the demo's data, its shape kept: the stages'
    names, order, data sets (the pretraining sets become the demo's captions) and overrides, each stage's YAML
    `X.yaml` as `tiny/X.yaml`, `steps` optimizer steps a stage, the demo suite."""
    demo = yaml.safe_load((ROOT / "jobs/configs/demo.yaml").read_text())
    config = {k: v for k, v in yaml.safe_load(shipped.read_text()).items() if k not in ("storage", "data_root")}
    config.update(
        name=name,
        registered_model=f"{name}-model",
        model_mode="copy",
        primary_metric=demo["primary_metric"],
        datasets=demo["datasets"],
        preprocess=demo["preprocess"],
        demo_data={"seed": 0, "captions": 48, "instruct": 48, "eval": 6},
        eval={"suite": "demo", "max_new_tokens": 4},
    )
    for stage in config["stages"].values():
        stage["config"] = f"tiny/{stage['config']}"
        stage["data"] = stage["data"] if stage["data"] in demo["datasets"] else "captions"
        stage["overrides"] = {**stage.get("overrides", {}), "max_steps": steps, "checkpoint_every": 0}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def runs_of(tracking: str, experiment: str):
    """The experiment's pipeline parent runs (oldest first) and, per parent run id, its node runs by node."""
    c = client(tracking)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=500)
    parents = [r for r in runs if "convllava.node" not in r.data.tags]
    children = {}
    for r in runs:
        if "convllava.node" in r.data.tags:
            children.setdefault(r.data.tags["mlflow.parentRunId"], {})[r.data.tags["convllava.node"]] = r
    return parents, children


class Recorder:
    """Counts, in this process (the driver), the plans made by stage name, and per run the `stage_config.yaml`
    uploads and the batches of params that carry a stage config's `lr`."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        from mlflow.tracking import MlflowClient

        self.plans: Counter[str] = Counter()
        self.configs: Counter[str] = Counter()
        self.params: Counter[str] = Counter()
        plan_stage, log_text, log_batch = jobs.train.preflight.plan_stage, MlflowClient.log_text, MlflowClient.log_batch

        def counted_plan(config, **kwargs):
            self.plans[config.name] += 1
            return plan_stage(config, **kwargs)

        def counted_text(client_, run_id, text, artifact_file):
            self.configs[run_id] += artifact_file == ARTIFACT_STAGE_CONFIG
            return log_text(client_, run_id, text, artifact_file)

        def counted_batch(client_, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
            self.params[run_id] += any(p.key == "lr" for p in params or ())
            return log_batch(client_, run_id, metrics, params, tags, *args, **kwargs)

        mp.setattr(jobs.train.preflight, "plan_stage", counted_plan)
        mp.setattr(MlflowClient, "log_text", counted_text)
        mp.setattr(MlflowClient, "log_batch", counted_batch)

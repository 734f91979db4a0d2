"""Pipelines of other shapes than the demo's three stages: LLaVA's two-stage recipe as shipped (jobs/configs/llava.yaml)
on the tiny preset, end to end through the CLI; a stage that starts from a registered model version.
(The paper's three stages, jobs/configs/cluster.yaml's shape, run in test_pipeline.py on demo.yaml.)"""

from __future__ import annotations

import subprocess

import pytest
from pipeline_harness import ROOT, pipeline_cli, runs_of, tiny_variant

from jobs.dag.runbook import TAG_OUTPUT
from jobs.tracking.runs import client, default_tracking_uri

pytestmark = pytest.mark.integration


def _cli(config, workdir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*pipeline_cli(config, workdir), *extra], capture_output=True, text=True, cwd=ROOT)


def test_llavas_two_stage_recipe_runs_end_to_end_and_every_view_follows_its_stages(tmp_path):
    config = tiny_variant(ROOT / "jobs/configs/llava.yaml", tmp_path / "llava.yaml", "llava-tiny")
    wd = tmp_path / "wd"
    done = _cli(config, wd)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["node", "status"]) + 2 :]
    summary = [line.split()[:2] for line in table[: table.index("")]]  # the summary table, in the YAML's order
    assert summary == [[n, "ran"] for n in ("preprocess", "pretrain", "finetune", "eval")], done.stdout

    tracking = default_tracking_uri(wd)
    (parent,), children = runs_of(tracking, "llava-tiny")
    runs = children[parent.info.run_id]
    assert sorted(runs) == ["eval", "finetune", "preprocess", "pretrain"]
    output = {node: run.data.tags[TAG_OUTPUT] for node, run in runs.items()}
    # Each stage starts from the one before it; eval measures the last.
    assert runs["pretrain"].data.tags["convllava.parent_checkpoint"] == ""
    assert runs["finetune"].data.tags["convllava.parent_checkpoint"] == output["pretrain"]
    assert runs["eval"].data.tags["convllava.parent_checkpoint"] == output["finetune"]
    assert runs["finetune"].data.params["name"] == "finetune" and runs["pretrain"].data.params["lr"] == "0.001"

    status = subprocess.run(
        [*pipeline_cli(config, wd, "pipeline status")], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()
    assert [line.split()[:2] for line in status[2:]] == [
        [n, "finished"] for n in ("preprocess", "pretrain", "finetune", "eval")
    ], status

    again = _cli(config, wd, "--from", "finetune")
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["node", "status"]) + 2 :]
    rows = dict(line.split()[:2] for line in table[: table.index("")])
    assert [rows[n] for n in ("preprocess", "pretrain", "finetune", "eval")] == ["skipped", "skipped", "ran", "ran"], (
        rows
    )

    refused = _cli(config, wd, "--from", "stage2")
    assert refused.returncode == 2
    assert "--from stage2: not a node of pipeline 'llava-tiny'; its nodes are preprocess, pretrain, finetune, eval" in (
        refused.stderr
    )

    # A stage may start from a registered version instead of the stage before it.
    from jobs.dag.config import PipelineConfig
    from jobs.dag.runner import TrainingDag

    dag = TrainingDag(PipelineConfig.from_yaml(config), wd, tracking, None)
    champion = client(tracking).get_model_version_by_alias("llava-tiny-model", "champion")
    assert dag.init_source(f"models:/llava-tiny-model/{champion.version}") == champion.tags["convllava.checkpoint_uri"]
    assert dag.init_source("models:/llava-tiny-model@champion") == champion.tags["convllava.checkpoint_uri"]
    assert dag.init_source(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"init_from models:/llava-tiny-model/99: no such registered model version"):
        dag.init_source("models:/llava-tiny-model/99")

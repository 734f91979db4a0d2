"""Two pipelines of different shapes started together on one machine, each on a local Ray of its own: the demo's
three stages (the paper's shape, jobs/configs/cluster.yaml's) and LLaVA's two-stage recipe as shipped
(jobs/configs/llava.yaml), both on the tiny preset, end to end through the CLI. Each output is quiet and follows
its own stages; every view of the two-stage one (summary, MLflow, status, --from, init_from) follows its list."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from pipeline_harness import NODES, ROOT, pipeline_cli, runs_of, small_config, tiny_variant

from jobs.tracking.runs import client, default_tracking_uri
from jobs.tracking.vocabulary import TAG_OUTPUT

pytestmark = pytest.mark.integration

QUIET_LINES = 100  # a 2-step-per-stage pipeline's whole non-TTY output: 291 lines before Ray's chatter was routed
LLAVA_NODES = ["preprocess", "pretrain", "finetune", "eval"]


def _cli(config, workdir, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*pipeline_cli(config, workdir), *extra], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory, ray_local):
    """`pipeline run` of the demo's three stages and of LLaVA's two, started together while this test session's
    Ray runs too; name → (config, workdir, returncode, stdout, stderr)."""
    tmp = tmp_path_factory.mktemp("shapes")
    configs = {
        "quiet-demo": small_config(tmp / "demo.yaml", "quiet-demo"),
        "llava-tiny": tiny_variant(ROOT / "jobs/configs/llava.yaml", tmp / "llava.yaml", "llava-tiny"),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {
        name: subprocess.Popen(
            pipeline_cli(config, tmp / name), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, config in configs.items()
    }
    outputs = {name: proc.communicate() for name, proc in procs.items()}
    return {name: (configs[name], tmp / name, procs[name].returncode, *outputs[name]) for name in configs}


def test_two_embedded_pipelines_at_once_each_quiet_on_its_own_ray(two_shapes):
    """Both finish; Ray Train's placement-group cleaners each watch their own instance (with several instances on a
    machine, Ray's State API client used to fail with "Found multiple active Ray instances"); each store holds its
    own pipeline only. And the output is the pipeline's: Ray Train's placement-group and worker-group lines and Ray
    Data's progress dumps stay in Ray's log files, prints are not doubled, and the summary is there."""
    for name, nodes in (("quiet-demo", NODES), ("llava-tiny", LLAVA_NODES)):
        _config, wd, returncode, stdout, stderr = two_shapes[name]
        assert returncode == 0, stderr[-3000:]
        _check_quiet(name, nodes, (stdout + stderr).splitlines())
        tracking = default_tracking_uri(wd)
        parents, children = runs_of(tracking, name)
        assert len(parents) == 1 and sorted(children[parents[0].info.run_id]) == sorted(nodes)
        other = next(n for n in two_shapes if n != name)
        assert client(tracking).get_experiment_by_name(other) is None, f"{other} recorded into {name}'s store"


def _check_quiet(name: str, nodes: list[str], lines: list[str]) -> None:
    assert len(lines) <= QUIET_LINES, "\n".join(lines)
    text = "\n".join(lines)
    for noise in (
        "PlacementGroupCleaner",
        "Found multiple active Ray instances",
        "logging_progress.py",
        "Execution plan of Dataset",
        "Started training worker group",
        "Reporting training result",
        "Loading weights",
        "Setting accelerator to CPU",
    ):
        assert noise not in text, noise
    # The progress view in a log: a line per node start and end, one per logged step (log_every 1, 2 steps a stage)
    n = len(nodes)
    for k, node in enumerate(nodes, start=1):
        assert f"[{k}/{n}] {node} started" in lines, node
        assert re.search(rf"^\[{k}/{n}\] {node} ran in [\d.]+ s", text, re.M), node
    for k, stage in enumerate(nodes[1:-1], start=2):
        steps = re.findall(
            rf"^\[{k}/{n}\] {stage} step (\d)/2  loss \d+\.\d{{4}}  [\d.]+ samples/s  ETA \d+:\d\d$", text, re.M
        )
        assert steps == ["1", "2"], stage
        assert len(re.findall(rf"\[{stage}\] trainable parameters: [\d,]+ of [\d,]+ \(", text)) == 1, stage
    assert re.search(r"^eval +ran +[\d.]+s +demo/overall = ", text, re.M)
    assert f"registered {name}-model version 1 as candidate; champion: promoted" in text


def _summary(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:2] == ["node", "status"]) + 2 :]
    return [line.split()[:2] for line in table[: table.index("")]]  # the summary table, in the YAML's order


def test_llavas_two_stage_recipe_and_every_view_follows_its_stages(two_shapes, tmp_path):
    config, wd, returncode, stdout, stderr = two_shapes["llava-tiny"]
    assert returncode == 0, stderr[-3000:]
    assert _summary(stdout) == [[n, "ran"] for n in LLAVA_NODES], stdout

    tracking = default_tracking_uri(wd)
    (parent,), children = runs_of(tracking, "llava-tiny")
    runs = children[parent.info.run_id]
    output = {node: run.data.tags[TAG_OUTPUT] for node, run in runs.items()}
    # Each stage starts from the one before it; eval measures the last.
    assert runs["pretrain"].data.tags["convllava.parent_checkpoint"] == ""
    assert runs["finetune"].data.tags["convllava.parent_checkpoint"] == output["pretrain"]
    assert runs["eval"].data.tags["convllava.parent_checkpoint"] == output["finetune"]
    assert runs["finetune"].data.params["name"] == "finetune" and runs["pretrain"].data.params["lr"] == "0.001"

    status = subprocess.run(
        [*pipeline_cli(config, wd, "pipeline status")], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()
    assert [line.split()[:2] for line in status[2:]] == [[n, "finished"] for n in LLAVA_NODES], status

    again = _cli(config, wd, "--from", "finetune")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _summary(again.stdout) == [
        ["preprocess", "skipped"],
        ["pretrain", "skipped"],
        ["finetune", "ran"],
        ["eval", "ran"],
    ], again.stdout

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

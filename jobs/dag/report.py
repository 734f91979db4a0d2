"""What a pipeline execution tells its user: the summary table on screen, the parent run's markdown description,
and `convllava pipeline status`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.dag.config import PipelineConfig
from jobs.dag.runbook import RunBook, key_metric
from jobs.tracking.runs import client, default_tracking_uri
from jobs.tracking.vocabulary import EVAL_METRICS_FILE, TAG_REUSED, TAG_SKIPPED

if TYPE_CHECKING:
    from jobs.dag.runner import PipelineResult


def accuracy_table(metrics: dict[str, float]) -> str:
    """Per question type: accuracy next to chance (the demo suite's `BENCH/TYPE/accuracy` and `/chance`)."""
    rows = [f"{'eval metric':28s} {'value':>8s} {'chance':>8s}"]
    for name, value in sorted(metrics.items()):
        if name.endswith("/chance"):
            continue
        chance = metrics.get(name.removesuffix("/accuracy") + "/chance")  # TYPE/accuracy → TYPE/chance, overall
        rows.append(f"{name:28s} {value:8.3f} {'' if chance is None else f'{chance:8.3f}'}")
    return "\n".join(rows)


def _width(nodes) -> int:
    """The node column's width: the longest stage name, at least that of `preprocess` and one space."""
    return max([11, *(len(n) + 1 for n in nodes)])


def _metric_text(metric: tuple[str, float] | None) -> str:
    return f"{metric[0]} = {metric[1]:.4f}" if metric else ""


def describe(name: str, result: PipelineResult) -> str:
    """The pipeline execution in markdown: one row per node (status, time, key metric) and the gate decision."""
    lines = [f"**{name}** — {'finished' if result.ok else 'failed'}", ""]
    lines += ["| node | status | time | key metric |", "|---|---|---|---|"]
    for n in result.nodes:
        lines.append(f"| {n.node} | {n.status} | {n.seconds:.1f} s | {_metric_text(n.metric)} |")
    done = {n.node for n in result.nodes}
    lines += [f"| {node} | not reached | | |" for node in result.planned if node not in done]
    if result.gate:
        g = result.gate
        champion = (
            f"version {g['champion_version']} ({g['champion_value']:.4f})" if g.get("champion_version") else "none"
        )
        lines += [
            "",
            f"**gate** on `{g['metric']}`: candidate version {g['version']} = {g['candidate_value']:.4f}, "
            f"champion before: {champion} → **{g['decision']}**",
        ]
    return "\n".join(lines)


def summary(result: PipelineResult, tracking_uri: str) -> str:
    """The table `pipeline run` prints at the end: nodes, times, key metrics, accuracy vs chance, where to look."""
    w = _width(result.planned)
    lines = [f"{'node':{w}s} {'status':8s} {'time':>8s}  key metric", "-" * (w + 49)]
    for n in result.nodes:
        lines.append(f"{n.node:{w}s} {n.status:8s} {n.seconds:7.1f}s  {_metric_text(n.metric)}")
    evaluated = next((n for n in result.nodes if n.node == "eval"), None)
    if evaluated is not None and (Path(evaluated.output) / EVAL_METRICS_FILE).is_file():
        lines += ["", accuracy_table(json.loads((Path(evaluated.output) / EVAL_METRICS_FILE).read_text()))]
    if result.gate:
        g = result.gate
        lines += ["", f"registered {g['model']} version {g['version']} as candidate; champion: {g['decision']}"]
    # MLflow 3.17's UI opens an experiment in its GenAI view unless the browser chose "Model training" (it ignores
    # the experiment's kind tag); this link chooses it.
    page = f"#/experiments/{result.experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith("sqlite:"):
        lines += ["", f"browse the runs: mlflow ui --backend-store-uri {tracking_uri}"]
        lines.append(f"                 then open http://127.0.0.1:5000/{page}")
    elif tracking_uri.startswith("http"):
        lines += ["", f"browse the runs: {tracking_uri.rstrip('/')}/{page}"]
    if result.gate:
        lines.append(
            f"serve the champion: MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve "
            f"-m models:/{result.gate['model']}@champion --env-manager local -p 5001"
        )
    return "\n".join(lines)


def pipeline_status(config_path: str, workdir: str = "work/pipeline", tracking_uri: str | None = None) -> str:
    """Each node of the latest execution: state, duration and key metric, from MLflow."""
    config = PipelineConfig.from_yaml(config_path)
    tracking_uri = tracking_uri or default_tracking_uri(Path(workdir).resolve())
    exp = client(tracking_uri).get_experiment_by_name(config.name)
    runs = None if exp is None else RunBook(tracking_uri, exp.experiment_id, config.name, config.primary_metric)
    parent = None if runs is None else runs.latest_execution()
    if parent is None:
        return f"pipeline {config.name}: no runs in {tracking_uri}"
    children = runs.children(parent.info.run_id)
    w = _width(config.nodes)
    lines = [
        f"pipeline {config.name}, run {parent.info.run_id} ({parent.info.status})",
        f"{'node':{w}s} {'state':10s} {'duration':>9s}  key metric",
    ]
    for node in config.nodes:
        r = children.get(node)
        if r is None:
            lines.append(f"{node:{w}s} {'pending':10s} {'':>9s}")
            continue
        state = "skipped" if r.data.tags.get(TAG_SKIPPED) == "true" else r.info.status.lower()
        end = r.info.end_time or int(time.time() * 1000)
        metric = key_metric(node, r.data.metrics, config.primary_metric)
        if metric is None and r.data.tags.get(TAG_REUSED):
            reused = runs.client.get_run(r.data.tags[TAG_REUSED])
            metric = key_metric(node, reused.data.metrics, config.primary_metric)
        lines.append(f"{node:{w}s} {state:10s} {(end - r.info.start_time) / 1000:8.1f}s  {_metric_text(metric)}")
    return "\n".join(lines)

"""MLflow as the user's window, checked the way a user looks at it: a real `mlflow server` on 127.0.0.1 over a
pipeline's store, what its REST API returns, and its pages rendered by headless Chromium (tools/mlflow_screenshots)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobs.tracking.runs import default_tracking_uri

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from mlflow_screenshots import VIEWPORT, api, capture, chromium_path, mlflow_server, pipeline_runs  # noqa: E402

STAGES = {"stage1": "captions", "stage2": "captions", "stage3": "instruct"}


@pytest.fixture(scope="module")
def server(executed_pipeline):
    root, _, _ = executed_pipeline
    with mlflow_server(default_tracking_uri(root / "wd")) as base:
        yield base


def _inputs(base: str, run_id: str) -> list[tuple[str, str, str]]:
    """(dataset name, context, source) of a run's inputs, as the run page lists them."""
    run = api(base, "runs/get", run_id=run_id)["run"]
    rows = []
    for entry in run.get("inputs", {}).get("dataset_inputs", []):
        context = {t["key"]: t["value"] for t in entry.get("tags", [])}.get("mlflow.data.context", "")
        rows.append((entry["dataset"]["name"], context, entry["dataset"]["source"]))
    return sorted(rows)


def test_what_the_rest_api_gives_the_ui(server):
    base = server
    exp = api(base, "experiments/get-by-name", experiment_name="dag-test")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    _, parent, nodes = pipeline_runs(base, "dag-test")
    assert sorted(nodes) == sorted(["preprocess", *STAGES, "eval"])
    # Lineage: raw data into preprocess, shards into each stage, questions into eval; the eval run owns the model.
    raw = _inputs(base, nodes["preprocess"]["info"]["run_id"])
    assert [(name, ctx) for name, ctx, _ in raw] == [("captions", "raw"), ("instruct", "raw")]
    for stage, data in STAGES.items():
        (name, ctx, source), *more = _inputs(base, nodes[stage]["info"]["run_id"])
        assert (name, ctx) == (data, "training") and not more and f"shards/{data}" in source, stage
        metrics = {
            m["key"] for m in api(base, "runs/get", run_id=nodes[stage]["info"]["run_id"])["run"]["data"]["metrics"]
        }
        assert {"train/loss", "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metrics
    evaluated = [(n, c) for n, c, _ in _inputs(base, nodes["eval"]["info"]["run_id"])]
    assert evaluated and all(n.startswith("eval/demo") and c == "evaluation" for n, c in evaluated)
    eval_run = api(base, "runs/get", run_id=nodes["eval"]["info"]["run_id"])["run"]
    assert eval_run["outputs"]["model_outputs"], "the eval run links to the model it logged"
    tags = {t["key"]: t["value"] for t in eval_run["data"]["tags"]}
    assert tags["mlflow.note.content"].startswith("# Evaluation: suite `demo`")
    listed = api(base, "artifacts/list", run_id=nodes["eval"]["info"]["run_id"], path="eval")
    assert {"eval/accuracy_vs_chance.png", "eval/samples.json"} <= {f["path"] for f in listed["files"]}
    parent_tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert parent_tags["mlflow.note.content"].startswith("**dag-test** — finished")


def test_the_pages_a_user_sees(server, tmp_path):
    if chromium_path() is None:
        pytest.skip("no chromium on PATH: `make install` installs Debian's chromium when run as root with apt-get")
    from PIL import Image, ImageStat

    texts = capture(server, "dag-test", tmp_path)
    runs = texts["runs"]
    assert "Model training" in runs and "Run Name" in runs and "Detect Issues" not in runs  # not the GenAI overview
    assert all(node in runs.split("\n") for node in ["dag-test", "preprocess", *STAGES, "eval"])  # expanded parent
    assert "captions (" in runs and "instruct (" in runs  # the Dataset column, with digests
    assert "demo/overall" in texts["eval_run"] and "dag-test-model" in texts["eval_run"]  # metric, registered model
    assert "Evaluation: suite" in texts["eval_run"] and "eval/demo" in texts["eval_run"]  # description, datasets
    assert "eval/accuracy_vs_chance.png" in texts["eval_chart"]
    assert "cpu_utilization_percentage" in texts["stage_system_metrics"]
    for name in texts:
        image = Image.open(tmp_path / f"{name}.png").convert("L")
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"]), name
        assert ImageStat.Stat(image).stddev[0] > 5 and len(image.getcolors(1 << 16)) > 64, name  # a page, not blank

"""What a stage records, counted: in a pipeline run and in `convllava train` alike, each stage's config goes into its
MLflow run once (params and `stage_config.yaml`) and its memory plan is made once; a pipeline's stage run holds the
very plan its preflight made (the one in the parent run)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from pipeline_harness import Recorder, runs_of
from train_harness import tiny

from jobs.tracking.runs import client, default_tracking_uri
from jobs.tracking.vocabulary import ARTIFACT_PLAN, ARTIFACT_STAGE_CONFIG, TAG_STAGE

pytestmark = pytest.mark.integration
STAGES = ["stage1", "stage2", "stage3"]


@pytest.fixture(scope="module")
def recorded(executed_pipeline_run):
    """The session's small demo pipeline (three stages, run in this process under a `Recorder`)."""
    root, _config, result, recorder = executed_pipeline_run
    return root, result, recorder


def test_a_pipeline_logs_each_stage_config_once_and_plans_each_stage_once(recorded):
    root, result, recorder = recorded
    assert result.ok and [n.status for n in result.nodes] == ["ran"] * 5
    assert recorder.plans == Counter(STAGES)  # the preflight's plan, none made again by the stage
    tracking = default_tracking_uri(root / "wd")
    parents, children = runs_of(tracking, "dag-test")
    parent = parents[0]  # the run that trained (the DAG tests re-run this pipeline: later parents reuse its nodes)
    c = client(tracking)
    for stage in STAGES:
        run = children[parent.info.run_id][stage]
        run_id = run.info.run_id
        assert run.data.tags[TAG_STAGE] and run.data.params["name"] == stage and "plan/fits" in run.data.params
        assert recorder.configs[run_id] == 1 and recorder.params[run_id] == 1, stage
        here = Path(c.download_artifacts(run_id, ARTIFACT_PLAN, str(root / stage))).read_text()
        preflight = c.download_artifacts(parent.info.run_id, f"{stage}/{ARTIFACT_PLAN}", str(root / "parent"))
        assert here == Path(preflight).read_text()  # the preflight's plan object, not one made on the shards
    assert sum(recorder.configs.values()) == len(STAGES)  # no other run got a stage config


def test_convllava_train_logs_its_config_once_and_plans_once(recorded, tmp_path, monkeypatch):
    """One stage outside the DAG (`run_stage` with only a tracking URI: what `convllava train` calls), on the shards
    the pipeline above wrote."""
    from jobs.train.driver import run_stage

    root, _, _ = recorded
    recorder = Recorder(monkeypatch)
    tracking = default_tracking_uri(tmp_path)
    config = tiny(1, root / "wd" / "shards" / "captions", max_steps=1, checkpoint_every=0)
    result = run_stage(config, str(tmp_path / "runs"), tracking_uri=tracking)
    assert result.steps == 1
    assert recorder.plans == Counter({config.name: 1})
    assert recorder.configs == Counter({result.run_id: 1}) and recorder.params[result.run_id] == 1
    run = client(tracking).get_run(result.run_id)
    assert float(run.data.params["lr"]) == config.lr and run.data.params["plan/fits"] == "True"
    assert {a.path for a in client(tracking).list_artifacts(result.run_id)} >= {ARTIFACT_STAGE_CONFIG, ARTIFACT_PLAN}

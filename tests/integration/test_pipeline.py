"""The pipeline DAG for real (local Ray, DeepSpeed, SQLite MLflow): run structure, skip on re-run, champion gate,
retrain, job submission to a local head (the killed driver: tests/reliability/test_kill_resume.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_harness import NODES, pipeline_cli, runs_of

from convllava.data.shards import Manifest
from jobs.dag.report import accuracy_table, pipeline_status
from jobs.dag.retrain import run_retrain
from jobs.dag.runner import PipelineLocked, run_pipeline, workdir_lock
from jobs.tracking import registry
from jobs.tracking.runs import client, default_tracking_uri

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def executed(executed_pipeline):
    return executed_pipeline


def test_run_structure_in_mlflow(executed):
    root, config, result = executed
    tracking = default_tracking_uri(root / "wd")
    assert result.ok and [n.node for n in result.nodes] == NODES and all(n.status == "ran" for n in result.nodes)
    parents, children = runs_of(tracking, "dag-test")
    assert len(parents) == 1 and parents[0].data.tags["convllava.pipeline"] == "dag-test"
    note = parents[0].data.tags["mlflow.note.content"]  # the run's description in the UI
    assert note.startswith("**dag-test** — finished") and all(f"| {n} | ran |" in note for n in NODES)
    assert "**gate** on `demo/overall`: candidate version 1" in note and "→ **promoted**" in note
    kids = children[parents[0].info.run_id]
    assert sorted(kids) == sorted(NODES) and all(r.info.status == "FINISHED" for r in kids.values())
    for node, run in kids.items():
        assert run.data.tags["convllava.node"] == node and run.data.tags["convllava.node_key"]
        assert run.data.tags["convllava.config_hash"]
    c = client(tracking)
    for stage, parent_ckpt in (("stage1", ""), ("stage2", "stage1"), ("stage3", "stage2")):
        run = kids[stage]
        assert run.data.tags["convllava.input_fingerprint"] and run.data.params["lr"]
        expected = kids[parent_ckpt].data.tags["convllava.output_uri"] if parent_ckpt else ""
        assert run.data.tags["convllava.parent_checkpoint"] == expected  # each stage starts from the recorded URI
        ref = json.loads(
            c.download_artifacts(run.info.run_id, "checkpoint.json", str(root))
            and Path(root, "checkpoint.json").read_text()
        )
        assert ref["uri"] == run.data.tags["convllava.output_uri"] and len(ref["sha256"]) == 64 and ref["size"] > 0
        history = c.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2]
    # What the MLflow UI shows: the training view, each stage's shards in the Dataset column, utilisation.
    assert c.get_experiment_by_name("dag-test").tags["mlflow.experimentKind"] == "custom_model_development"
    raw = {d.dataset.name: d for d in c.get_run(kids["preprocess"].info.run_id).inputs.dataset_inputs}
    assert sorted(raw) == ["captions", "instruct"]
    assert all({t.key: t.value for t in d.tags}["mlflow.data.context"] == "raw" for d in raw.values())
    for stage in ("stage1", "stage2", "stage3"):
        run = c.get_run(kids[stage].info.run_id)
        (data,) = run.inputs.dataset_inputs
        shards = json.loads(data.dataset.source)["uri"]
        manifest = Manifest.load(shards)
        assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == "training"
        assert data.dataset.name == Path(shards).name and data.dataset.source_type == "local"
        assert data.dataset.digest == manifest.fingerprint.split("-")[-1]  # what ShardSet checks on resume
        assert json.loads(data.dataset.profile)["num_rows"] == manifest.written
        system = {k for k in run.data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    artifacts = {a.path for a in c.list_artifacts(kids["preprocess"].info.run_id, "manifests")}
    assert artifacts == {"manifests/captions.json", "manifests/instruct.json"}
    assert {a.path for a in c.list_artifacts(kids["eval"].info.run_id, "eval")} >= {
        "eval/report.md",
        "eval/metrics.json",
    }
    assert "eval/demo/overall" in kids["eval"].data.metrics
    # The eval run's pictures: the accuracy chart and the sample-predictions table, thumbnails included.
    eval_dir = Path(c.download_artifacts(kids["eval"].info.run_id, "", str(root / "eval-artifacts")))
    assert (eval_dir / "eval" / "accuracy_vs_chance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((eval_dir / "eval" / "samples.json").read_text())
    assert table["columns"] == ["image", "benchmark", "question", "answer", "reference", "correct"]
    assert 0 < len(table["data"]) <= 48 and all((eval_dir / row[0]["filepath"]).is_file() for row in table["data"])
    metrics = json.loads((eval_dir / "eval" / "metrics.json").read_text())
    if metrics["demo/overall"] == 0:
        assert not any(row[5] for row in table["data"])  # nothing right overall: no sample marked correct
    version = c.get_model_version_by_alias("dag-test-model", "candidate")
    assert int(version.version) == 1 and int(c.get_model_version_by_alias("dag-test-model", "champion").version) == 1
    assert version.source.startswith("models:/")  # an MLflow model, logged in the eval run
    assert version.tags["convllava.checkpoint_uri"] == kids["stage3"].data.tags["convllava.output_uri"]
    (logged,) = c.search_logged_models([exp.experiment_id for exp in [c.get_experiment_by_name("dag-test")]])
    assert logged.source_run_id == kids["eval"].info.run_id and version.source == logged.model_uri
    assert "mlflow ui --backend-store-uri sqlite:///" in result.summary


def _question(root: Path) -> tuple[str, str]:
    """A demo eval image (base64 PNG) and its question."""
    import base64

    record = json.loads((root / "wd" / "data" / "eval" / "detail.jsonl").read_text().splitlines()[0])
    image = (root / "wd" / "data" / record["image"]).read_bytes()
    return base64.b64encode(image).decode(), record["question"]


def test_the_champion_is_an_mlflow_model_that_loads_and_answers(executed, monkeypatch):
    import mlflow
    import pandas as pd

    root, _, _ = executed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(root / "wd"))
    model = mlflow.pyfunc.load_model("models:/dag-test-model@champion")
    image, question = _question(root)
    answers = model.predict(pd.DataFrame({"image": [image, ""], "question": [question, "Say hello."]}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(Exception, match="row 0: image is not a base64-encoded image file"):
        model.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"], "question": [question]}))


def test_mlflow_models_serve_answers_over_http(executed):
    """`mlflow models serve -m models:/NAME@champion` on 127.0.0.1, one POST to /invocations; the server is stopped
    after at most 5 minutes whatever happens."""
    import urllib.request

    root, _, _ = executed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the serving command runs `uvicorn` from PATH: the environment's bin folder, as in an activated venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": default_tracking_uri(root / "wd"), "PATH": path}
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [
            mlflow_cli,
            "models",
            "serve",
            "-m",
            "models:/dag-test-model@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline, ready = time.time() + 300, False
        while time.time() < deadline and server.poll() is None and not ready:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200
            except OSError:
                time.sleep(1)
        assert ready, server.stderr.read().decode()[-3000:] if server.poll() is not None else "no /ping in 5 min"
        image, question = _question(root)
        body = json.dumps({"dataframe_split": {"columns": ["image", "question"], "data": [[image, question]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert len(reply["predictions"]) == 1 and isinstance(reply["predictions"][0], str)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_rerun_skips_finished_nodes_and_status(executed):
    root, config, _ = executed
    again = run_pipeline(str(config), workdir=str(root / "wd"))
    assert [n.status for n in again.nodes] == ["skipped"] * 5
    tracking = default_tracking_uri(root / "wd")
    parents, children = runs_of(tracking, "dag-test")
    assert len(parents) == 2 and sorted(children[parents[-1].info.run_id]) == sorted(NODES)
    assert int(client(tracking).get_model_version_by_alias("dag-test-model", "candidate").version) == 1
    status = pipeline_status(str(config), workdir=str(root / "wd"))
    for node in NODES:
        assert f"\n{node}" in status and "skipped" in status
    assert "train/loss" in status and "eval/demo/overall" in status


def test_champion_gate_keeps_a_better_champion(executed):
    root, _, _ = executed
    tracking = default_tracking_uri(root / "wd")
    champion_version, champion_value = registry.current_champion(tracking, "dag-test-model")
    c = client(tracking)
    run = c.create_run(c.get_experiment_by_name("dag-test").experiment_id).info.run_id
    worse = registry.register_and_gate(
        tracking, "dag-test-model", "/tmp/worse", run, "demo/overall", champion_value - 1.0
    )
    assert worse["decision"] == "kept the current champion" and worse["champion_value"] == champion_value
    assert int(c.get_model_version_by_alias("dag-test-model", "champion").version) == int(champion_version)
    assert int(c.get_model_version_by_alias("dag-test-model", "candidate").version) == worse["version"]
    better = registry.register_and_gate(
        tracking, "dag-test-model", "/tmp/better", run, "demo/overall", champion_value + 1
    )
    assert better["decision"] == "promoted"
    assert int(c.get_model_version_by_alias("dag-test-model", "champion").version) == better["version"]
    tags = c.get_model_version("dag-test-model", str(worse["version"])).tags
    assert float(tags["convllava.gate.candidate_value"]) == champion_value - 1.0


def test_retrain_is_a_no_op_until_the_data_changes(executed):
    root, config, _ = executed
    wd = root / "wd"
    outcome = run_retrain(str(config), workdir=str(wd))
    assert outcome.ok and not outcome.ran and "no-op: the raw data is unchanged" in outcome.message
    instruct = wd / "data" / "instruct.jsonl"
    lines = instruct.read_text().splitlines()
    new = [json.loads(line) for line in lines[:3]]
    for i, rec in enumerate(new):
        rec["id"] = f"new-{i}"
    instruct.write_text("\n".join(lines + [json.dumps(r) for r in new]) + "\n")
    # The schedule fires twice on the same tick: both retrains start at once; exactly one runs the pipeline.
    cli = pipeline_cli(config, wd, "retrain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(cli, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    ran = [out for out, _ in outputs if "retrain: ran the pipeline" in out]
    assert len(ran) == 1 and sum("retrain: no-op" in out for out, _ in outputs) == 1
    # The node table follows the "ran the pipeline" line (worker output may come before it); the eval table follows.
    table = ran[0].split("retrain: ran the pipeline", 1)[1].split("\n\n")[0]
    statuses = {
        line.split()[0]: line.split()[1] for line in table.splitlines() if line.split()[:1] in ([n] for n in NODES)
    }
    assert statuses == {
        "preprocess": "ran",
        "stage1": "skipped",
        "stage2": "skipped",
        "stage3": "ran",
        "eval": "ran",
    }, ran[0]
    manifest = Manifest.load(str(wd / "shards" / "instruct"))
    assert manifest.run.processed == 3 and manifest.run.reused == manifest.read - 3
    assert run_retrain(str(config), workdir=str(wd)).ran is False


def test_a_second_run_on_the_same_workdir_refuses(tmp_path):
    with workdir_lock(tmp_path):
        with pytest.raises(PipelineLocked, match="in use by another pipeline run"):
            with workdir_lock(tmp_path):
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_a_local_head(tmp_path):
    import tempfile

    import psutil

    from jobs.submit import follow, job_logs, job_status, submit

    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's socket paths live below it
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=1",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert start.returncode == 0, start.stderr
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        address = f"http://127.0.0.1:{dash}"
        with pytest.raises(ValueError, match="not a valid convllava command"):
            submit(address, ["info", "--preset"], working_dir=str(ROOT))
        job_id = submit(address, ["info", "--preset", "tiny"], working_dir=str(ROOT))
        streamed = io.StringIO()
        assert follow(address, job_id, out=streamed) == "SUCCEEDED"
        assert "vision_trunk" in streamed.getvalue()  # the log as it ran
        assert "vision_trunk" in job_logs(address, job_id) and "SUCCEEDED" in job_status(address, job_id)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        # `ray stop` would stop every Ray on the machine (the test session's too): stop only this head's processes.
        for proc in psutil.process_iter(["cmdline"]):
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()


def test_demo_recipe_resolves_and_trains_the_random_lm_from_stage_1():
    """The demo's overrides (which small_config replaces) build valid stages: the tiny LM starts random, so stage 1
    trains it; in every stage the tower learns at most a tenth of the LM's rate; captions, then instructions."""
    from jobs.dag.config import PipelineConfig
    from jobs.train.config import StageConfig

    config = PipelineConfig.from_yaml(ROOT / "jobs/configs/demo.yaml")
    stages = {node: config.stage_config(node, f"shards/{node}", None) for node in ("stage1", "stage2", "stage3")}
    assert [config.stages[n].data for n in stages] == ["captions", "captions", "instruct"]
    assert {"llm", "projector", "vision.stage5"} <= set(stages["stage1"].trainable)
    assert [s.epochs for s in stages.values()] == [1, 3, 5] and all(s.max_steps is None for s in stages.values())
    # ZeRO-2 throughout: nothing to partition in a 1M-parameter model; the tiny configs keep the paper's ZeRO-3
    assert [s.deepspeed for s in stages.values()] == ["zero2"] * 3
    assert StageConfig.from_yaml(ROOT / "jobs/configs/tiny/stage2.yaml").deepspeed == "zero3"
    for node, stage in stages.items():
        vision = {g for g in stage.trainable if g.startswith("vision")}
        assert set(stage.lr_groups) == vision, node
        assert all(rate <= stage.lr / 10 for rate in stage.lr_groups.values()), node


def test_accuracy_table_puts_each_accuracy_next_to_its_own_chance():
    metrics = {
        "demo/color/accuracy": 0.5,
        "demo/color/chance": 1 / 6,
        "demo/overall": 0.4,
        "demo/overall/chance": 0.21,
        "demo/pope/accuracy": 0.75,
    }
    rows = {line.split()[0]: line.split()[1:] for line in accuracy_table(metrics).splitlines()[1:]}
    assert rows == {
        "demo/color/accuracy": ["0.500", "0.167"],
        "demo/overall": ["0.400", "0.210"],
        "demo/pope/accuracy": ["0.750"],
    }

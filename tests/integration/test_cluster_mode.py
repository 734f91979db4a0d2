"""Cluster mode end to end, as a team runs it: MLflow as infra/mlflow deploys it (`mlflow server` on PostgreSQL, its
artifacts proxied into S3 on moto's server), a Ray cluster of three real raylets (`ray.cluster_utils.Cluster`: a head
with no CPUs for drivers and two worker nodes), shards and checkpoints on S3, and pipelines sent with `convllava
submit`. Everything is checked through the server's REST API, as the UI and other clients see it."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_harness import NODES, pipeline_cli, small_config
from tracking_harness import free_port

from convllava.io.storage import upload_dir
from convllava.modeling.checkpoint import save_checkpoint
from jobs.tracking import registry
from jobs.tracking.model import example_image, log_model
from jobs.tracking.runs import client, ensure_experiment

pytestmark = pytest.mark.integration
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from mlflow_screenshots import api, pipeline_runs, post  # noqa: E402


@pytest.fixture(params=["sqlite", "server"])
def tracking(request, tmp_path):
    """(tracking URI, artifact location) of each backend the registry must work on: a SQLite store in this process,
    and the REST API of the deployed server (PostgreSQL behind it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    return request.getfixturevalue("deployed_mlflow").uri, None


def test_the_eval_nodes_registration_and_gate_work_on_every_backend(
    tracking, tiny_model, tiny_processor, tmp_path, monkeypatch
):
    """The eval node's calls: log the checkpoint as an MLflow model into the eval run, register it (alias candidate),
    apply the champion gate; the champion then loads with mlflow.pyfunc by its alias through the same store."""
    import mlflow

    uri, artifacts = tracking
    checkpoint = str(save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt"))
    name = f"gate-{tmp_path.name}"  # the server is shared by the session: a registered model of this test's own
    experiment = ensure_experiment(uri, name, artifacts)
    c = client(uri)
    gates = []
    for value in (0.5, 0.25, 0.75):
        run_id = c.create_run(experiment).info.run_id
        logged = log_model(uri, run_id, checkpoint, example_image(), max_new_tokens=4)
        gate = registry.register_and_gate(
            uri,
            name,
            logged.model_uri,
            run_id,
            "demo/overall",
            value,
            checkpoint_uri=checkpoint,
            model_id=logged.model_id,
        )
        version = c.get_model_version(name, str(gate["version"]))
        assert version.source == logged.model_uri
        assert version.run_id == run_id and version.tags["convllava.checkpoint_uri"] == checkpoint
        gates.append(gate)
    assert [g["decision"] for g in gates] == ["promoted", "kept the current champion", "promoted"]
    assert [g["version"] for g in gates] == [1, 2, 3] and gates[1]["champion_value"] == 0.5
    assert int(c.get_model_version_by_alias(name, "candidate").version) == 3
    assert registry.current_champion(uri, name) == (3, 0.75)
    assert registry.champion_source(uri, name) == checkpoint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    image = base64.b64encode(example_image()).decode()
    (answer,) = model.predict(pd.DataFrame({"image": [image], "question": ["What is shown?"]}))
    assert isinstance(answer, str)
    if artifacts is None:  # the server stored the model in its S3 bucket, not on a disk of this machine
        import boto3

        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
        assert any(k.endswith("model.safetensors") for k in keys) and any(k.endswith("MLmodel") for k in keys)


# ---------------------------------------------------------------------------------------------------------------------
# A Ray cluster of three raylets, raw data and shards on S3, two pipelines submitted at once, retraining, an outage.

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAW, STORE = "cluster-raw", "cluster-store"  # buckets: raw data as a lab keeps it; shards, checkpoints
# The train/loss steps that MLflow's PostgreSQL holds for a run, by run name.
STORED_STEPS = (
    "select m.step from metrics m join runs r on m.run_uuid = r.run_uuid "
    "where r.name = %s and m.key = 'train/loss' order by m.step"
)


@pytest.fixture(scope="module")
def ray_cluster(s3_server, tmp_path_factory):
    """A head (no CPUs: drivers, the dashboard and job server, as on KubeRay) and two worker nodes of 2 CPUs, all real
    raylets on this machine. Their processes inherit this environment: S3 endpoint and keys (as pods get them from a
    Secret), the project's `convllava` on PATH, a download cache of their own. Each node has a Ray temp dir of its
    own, as separate machines have their own disks: sharing one, the nodes' runtime-env agents unpack the job's
    working dir into the same folder, one replacing it under the job driver that runs in it. Yields the cluster and
    the dashboard's address."""
    from ray.cluster_utils import Cluster

    def temp_dir() -> str:  # short: Ray's socket paths live below it
        return tempfile.mkdtemp(prefix="raycl", dir="/tmp")

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        env.setenv("CONVLLAVA_CACHE", str(tmp_path_factory.mktemp("cluster-cache")))
        env.delenv("RAY_ADDRESS", raising=False)
        dashboard = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                "temp_dir": temp_dir(),
            },
        )
        dirs = [cluster.head_node.get_temp_dir_path()]
        try:
            for _ in range(2):
                node = cluster.add_node(num_cpus=2, object_store_memory=300 << 20, temp_dir=temp_dir())
                dirs.append(node.get_temp_dir_path())
            cluster.wait_for_nodes()
            yield cluster, f"http://127.0.0.1:{dashboard}"
        finally:
            cluster.shutdown()  # also forgets it as the machine's current cluster (embedded runs would join it)
            for path in dirs:
                shutil.rmtree(path, ignore_errors=True)


def _raw_data(root: Path) -> Path:
    """The demo data, small, on the "shared volume" (`root`), where eval suites are read from, and uploaded to
    s3://RAW/raw/, where a lab keeps raw data and the pipelines read their training data."""
    import boto3

    from pipelines.demo.data import generate_demo_data

    generate_demo_data(root, seed=0, n_caption=48, n_instruct=48, n_eval=6)
    boto3.client("s3").create_bucket(Bucket=RAW)
    upload_dir(root, f"s3://{RAW}/raw")  # the held-out questions too: eval reads them from the volume only
    return root


def _cluster_config(path: Path, name: str, data: Path) -> Path:
    """The small pipeline (demo.yaml's DAG, 2 steps a stage) in the shape of jobs/configs/cluster.yaml: raw data and
    storage on S3 (the data sets' relative paths under an s3:// data_root), the eval suite's data on the shared
    volume, no generated demo data."""
    config = yaml.safe_load(small_config(path, name).read_text())
    del config["demo_data"]
    config["data_root"] = f"s3://{RAW}/raw"
    config["storage"] = f"s3://{STORE}/{name}"
    config["eval"]["data_root"] = str(data)
    path.write_text(yaml.safe_dump(config))
    return path


def _submit(dashboard: str, *command: str) -> subprocess.Popen:
    """`convllava submit --wait -- COMMAND` from the repository, as a user sends a job."""
    cli = [str(BIN / "convllava"), "submit", "--address", dashboard, "--wait", "--", *command]
    return subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-6000:]
    assert out.splitlines()[-1].endswith(" SUCCEEDED"), out[-3000:]
    return out


def _pipeline(config: Path, workdir: Path, tracking: str, command: str = "pipeline run") -> list[str]:
    """The convllava arguments (after `submit --`) that run `config` tracked on the server."""
    return [*pipeline_cli(config, workdir, command)[1:], "--tracking-uri", tracking]


@pytest.fixture(scope="module")
def two_pipelines(ray_cluster, deployed_mlflow, tmp_path_factory):
    """Two pipelines (`alpha`, `beta`) submitted at the same time to the cluster, tracked on the same server."""
    import boto3

    _, dashboard = ray_cluster
    root = tmp_path_factory.mktemp("cluster-mode")
    boto3.client("s3").create_bucket(Bucket=STORE)
    data = _raw_data(root / "shared" / "data")
    configs = {name: _cluster_config(root / f"{name}.yaml", name, data) for name in ("alpha", "beta")}
    workdirs = {name: root / "shared" / f"work-{name}" for name in configs}
    started = time.time()
    procs = {n: _submit(dashboard, *_pipeline(configs[n], workdirs[n], deployed_mlflow.uri)) for n in configs}
    outputs = {name: _finished(proc) for name, proc in procs.items()}
    print(f"cluster mode: two pipelines at once in {time.time() - started:.0f} s")
    return root, configs, workdirs, outputs


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _history(base: str, run_id: str, key: str) -> list[int]:
    return sorted(m["step"] for m in api(base, "metrics/get-history", run_id=run_id, metric_key=key)["metrics"])


def _versions(base: str, model: str) -> list[dict]:
    found = api(base, "model-versions/search", filter=f"name='{model}'")["model_versions"]
    return sorted(found, key=lambda v: int(v["version"]))


def _aliases(base: str, model: str) -> dict[str, str]:
    """alias → version of a registered model."""
    found = api(base, "registered-models/get", name=model)["registered_model"].get("aliases", [])
    return {a["alias"]: a["version"] for a in found}


def test_two_pipelines_submitted_at_once_each_record_only_their_own(two_pipelines, deployed_mlflow):
    root, configs, _, outputs = two_pipelines
    base = deployed_mlflow.uri
    experiments = {}
    for name, out in outputs.items():
        assert f"registered {name}-model version 1 as candidate; champion: promoted" in out, out[-3000:]
        assert f"browse the runs: {base}/#/experiments/" in out
        experiment_id, parent, nodes = pipeline_runs(base, name)
        experiments[name] = experiment_id
        assert parent["info"]["status"] == "FINISHED" and sorted(nodes) == sorted(NODES)
        assert all(run["info"]["status"] == "FINISHED" for run in nodes.values())
        ids = {run["info"]["run_id"] for run in nodes.values()} | {parent["info"]["run_id"]}
        # Only this pipeline's runs in its experiment, and every one of them tagged with it.
        body = {"experiment_ids": [experiment_id], "max_results": 100}
        everything = post(base, "runs/search", body)["runs"]
        assert {r["info"]["run_id"] for r in everything} == ids
        assert {_tags(r)["convllava.pipeline"] for r in everything} == {name}
        # Raw data in from S3, shards and checkpoints out to S3; nothing of the other pipeline's storage.
        raw = api(base, "runs/get", run_id=nodes["preprocess"]["info"]["run_id"])["run"]["inputs"]["dataset_inputs"]
        assert sorted(json.loads(d["dataset"]["source"])["uri"] for d in raw) == [
            f"s3://{RAW}/raw/captions.json",
            f"s3://{RAW}/raw/instruct.jsonl",
        ]
        for stage in ("stage1", "stage2", "stage3"):
            run_id = nodes[stage]["info"]["run_id"]
            (shards,) = api(base, "runs/get", run_id=run_id)["run"]["inputs"]["dataset_inputs"]
            assert json.loads(shards["dataset"]["source"])["uri"].startswith(f"s3://{STORE}/{name}/shards/")
            assert _tags(nodes[stage])["convllava.output_uri"].startswith(f"s3://{STORE}/{name}/runs/{stage}-")
            for key in ("train/loss", "train/lr", "train/grad_norm"):  # every step's metrics, each once
                assert _history(base, run_id, key) == [1, 2], (name, stage, key)
            listed = {f["path"] for f in api(base, "artifacts/list", run_id=run_id)["files"]}
            assert {"stage_config.yaml", "checkpoint.json", "plan.txt"} <= listed, listed
        eval_id = nodes["eval"]["info"]["run_id"]
        eval_files = {f["path"] for f in api(base, "artifacts/list", run_id=eval_id, path="eval")["files"]}
        assert {"eval/metrics.json", "eval/report.md", "eval/accuracy_vs_chance.png"} <= eval_files
        (version,) = _versions(base, f"{name}-model")
        assert version["run_id"] == eval_id and version["source"].startswith("models:/m-")
        assert _aliases(base, f"{name}-model") == {"candidate": "1", "champion": "1"}
        assert {t["key"]: t["value"] for t in version["tags"]}["convllava.checkpoint_uri"] == _tags(nodes["stage3"])[
            "convllava.output_uri"
        ]
    assert experiments["alpha"] != experiments["beta"]
    # The registered model, logged in the eval run, went through the server into its own S3 bucket.
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    for experiment_id in experiments.values():
        assert any(k.startswith(f"mlflow/{experiment_id}/") and k.endswith("model.safetensors") for k in keys)


def test_the_champion_loads_through_the_server_and_retrain_runs_as_a_job(
    two_pipelines, ray_cluster, deployed_mlflow, monkeypatch
):
    import boto3
    import mlflow

    root, configs, workdirs, _ = two_pipelines
    _, dashboard = ray_cluster
    base = deployed_mlflow.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
    model = mlflow.pyfunc.load_model("models:/alpha-model@champion")
    image = base64.b64encode(example_image()).decode()
    (answer,) = model.predict(pd.DataFrame({"image": [image], "question": ["What is shown?"]}))
    assert isinstance(answer, str)

    retrain = _pipeline(configs["alpha"], workdirs["alpha"], base, "retrain")
    out = _finished(_submit(dashboard, *retrain))
    assert "retrain: no-op: the raw data is unchanged" in out, out[-3000:]

    # New instructions land in the raw bucket: the next scheduled retrain re-runs what they change.
    s3 = boto3.client("s3")
    lines = s3.get_object(Bucket=RAW, Key="raw/instruct.jsonl")["Body"].read().decode().splitlines()
    new = [json.loads(line) for line in lines[:3]]
    for i, record in enumerate(new):
        record["id"] = f"new-{i}"
    s3.put_object(Bucket=RAW, Key="raw/instruct.jsonl", Body="\n".join(lines + [json.dumps(r) for r in new]) + "\n")
    out = _finished(_submit(dashboard, *retrain))
    assert "retrain: ran the pipeline (raw data changed since run" in out, out[-3000:]
    _, parent, nodes = pipeline_runs(base, "alpha")
    assert {n: _tags(r)["convllava.skipped"] for n, r in nodes.items()} == {
        "preprocess": "false",
        "stage1": "true",
        "stage2": "true",
        "stage3": "false",
        "eval": "false",
    }
    assert _history(base, nodes["stage3"]["info"]["run_id"], "train/loss") == [1, 2]
    first, second = _versions(base, "alpha-model")
    assert second["run_id"] == nodes["eval"]["info"]["run_id"]
    gate = {t["key"]: t["value"] for t in second["tags"]}
    assert gate["convllava.gate.champion_version"] == "1" and gate["convllava.gate.decision"] in (
        "promoted",
        "kept the current champion",
    )
    champion = first if gate["convllava.gate.decision"] == "kept the current champion" else second
    assert _aliases(base, "alpha-model") == {"candidate": "2", "champion": champion["version"]}
    assert [v["version"] for v in _versions(base, "beta-model")] == ["1"]  # the other pipeline's model: untouched


def test_a_stage_keeps_training_while_the_tracking_server_restarts(
    two_pipelines, ray_cluster, deployed_mlflow, postgres
):
    """`convllava train --address` on the cluster, checkpoints on S3, the deployed server stopped once step 4's
    checkpoint is stored and started again (same port, same PostgreSQL) once step 8's is: training never waits for
    it, and every step's metrics are in the run afterwards, each once."""
    import boto3

    cluster, _ = ray_cluster
    server, steps = deployed_mlflow, 12
    shards = f"s3://{STORE}/alpha/shards/captions"
    train = [
        str(BIN / "convllava"),
        "train",
        "--config",
        str(ROOT / "jobs/configs/tiny/stage1.yaml"),
        "--address",
        cluster.address,
        "--storage",
        f"s3://{STORE}/outage",
        "--tracking-uri",
        server.uri,
        "--run-name",
        "outage",
        "--workdir",
        str(two_pipelines[0] / "outage"),
        f"data={shards}",
        f"max_steps={steps}",
        "epochs=8",  # 48 captions: 3 steps an epoch
        "checkpoint_every=4",
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    s3 = boto3.client("s3")

    def wait_for_checkpoint(step: int) -> None:
        prefix = f"outage/outage/checkpoint_{step:06d}/"
        while not s3.list_objects_v2(Bucket=STORE, Prefix=prefix).get("KeyCount"):
            assert proc.poll() is None, f"the stage ended before checkpoint {step}:\n{proc.stdout.read()[-4000:]}"
            time.sleep(0.2)

    wait_for_checkpoint(4)
    server.stop()
    stored = [s for (s,) in postgres.query(STORED_STEPS, "outage")]  # the server is down: a consistent view
    wait_for_checkpoint(8)  # steps go on against a down server
    server.start()
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert stored and stored == list(range(1, len(stored) + 1)) and stored[-1] < 8, stored
    (run,) = post(server.uri, "runs/search", {"experiment_ids": [_experiment(server.uri, "convllava")]})["runs"]
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    for key in ("train/loss", "train/lr", "train/step_time_s", "train/grad_norm"):
        assert _history(server.uri, run_id, key) == list(range(1, steps + 1)), key  # every step, each once
    print(f"tracking outage on the cluster: {stored[-1]} steps stored before the stop, the rest sent after")


def _experiment(base: str, name: str) -> str:
    return api(base, "experiments/get-by-name", experiment_name=name)["experiment"]["experiment_id"]

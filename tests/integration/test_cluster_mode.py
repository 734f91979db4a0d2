"""Cluster mode end to end, as a team runs it: MLflow as infra/mlflow deploys it (`mlflow server` on PostgreSQL, its
artifacts proxied into S3 on moto's server), a Ray cluster of three real raylets (`ray.cluster_utils.Cluster`: a head
with no CPUs for drivers and two worker nodes), shards and checkpoints on S3, and pipelines sent with `convllava
submit`. Everything is checked through the server's REST API, as the UI and other clients see it."""

from __future__ import annotations

import base64

import pandas as pd
import pytest

from convllava.checkpoint import save_checkpoint
from jobs.tracking import registry
from jobs.tracking.model import example_image, log_model
from jobs.tracking.runs import client, ensure_experiment

pytestmark = pytest.mark.integration


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

"""The registered form of a checkpoint: an MLflow pyfunc model, copying the checkpoint or referencing it."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pandas as pd
import pytest

from convllava.modeling.checkpoint import save_checkpoint
from convllava.modeling.inference import GenerationOptions, generate
from jobs.dag.report import describe
from jobs.dag.runbook import NodeOutcome
from jobs.dag.runner import PipelineResult
from jobs.tracking.model import example_image, log_model
from jobs.tracking.runs import client, default_tracking_uri, ensure_experiment


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("mode", ["copy", "reference"])
def test_a_logged_model_answers_as_the_checkpoint_does(mode, tiny_model, tiny_processor, photos, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    checkpoint = save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment(uri, "models", str(tmp_path / "artifacts"))
    run_id = client(uri).create_run(experiment).info.run_id
    model_uri = log_model(uri, run_id, str(checkpoint), example_image(), mode=mode, max_new_tokens=6).model_uri
    # Logging leaves the process's tracking URI as it found it: the next pipeline's default store is its own.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert default_tracking_uri(tmp_path / "other") == f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(model_uri)
    stored = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "dl")))
    assert (stored / "MLmodel").is_file()
    assert any(stored.rglob("model.safetensors")) == (mode == "copy")  # reference: the URI only, no weights
    assert model.metadata.get_input_schema().input_names() == ["image", "question"]

    from PIL import Image

    image = Image.open(photos[0].path).convert("RGB")
    frame = pd.DataFrame({"image": [_png(image), ""], "question": ["What is this?", "Count to three."]})
    answers = model.predict(frame)
    # The checkpoint itself, greedy, same options, on the PNG-decoded image: the same answers.
    decoded = Image.open(io.BytesIO(base64.b64decode(frame["image"][0]))).convert("RGB")
    expected = generate(
        tiny_model, tiny_processor, list(frame["question"]), [decoded, None], GenerationOptions(max_new_tokens=6)
    )
    assert answers == expected


def test_the_parent_runs_description_summarises_the_pipeline():
    result = PipelineResult(
        ok=True,
        parent_run_id="p",
        planned=("preprocess", "stage1", "finetune", "eval"),
        nodes=[
            NodeOutcome("preprocess", "ran", 9.5, "shards", "r1", ("written", 112)),
            NodeOutcome("stage1", "skipped", 0.1, "m1", "r2", ("train/loss", 6.25)),
        ],
    )
    result.gate = {
        "metric": "demo/overall",
        "version": 3,
        "candidate_value": 0.5,
        "champion_version": 2,
        "champion_value": 0.625,
        "decision": "kept the current champion",
    }
    text = describe("demo", result)
    assert text.splitlines()[0] == "**demo** — finished"
    assert "| preprocess | ran | 9.5 s | written = 112.0000 |" in text
    assert "| stage1 | skipped | 0.1 s | train/loss = 6.2500 |" in text
    assert "| finetune | not reached | | |\n| eval | not reached | | |" in text  # the config's nodes, in order
    assert text.endswith("champion before: version 2 (0.6250) → **kept the current champion**")

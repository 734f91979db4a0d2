"""A ConvLLaVA checkpoint as an MLflow model: what the registry's versions point at, so that

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"image": [b64], "question": [q]}))
    mlflow models serve -m models:/NAME@champion --env-manager local -p 5001

answer image questions. `image` is a base64-encoded image file (PNG, JPEG, ...) or empty for a text-only
question; the prediction is one answer string per row.

Two ways to hold the weights (`mode`): `copy` (the default) puts the checkpoint folder inside the MLflow model's
artifacts, so the model is self-contained wherever the tracking server's artifact store is; `reference` records
only the checkpoint's URI (local or `s3://`) and loads it from there, for paper-size checkpoints (tens of GB) that
should not be copied a second time.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import warnings
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models.model import ModelInfo

from jobs.dag.config import MODEL_MODES as MODES
from jobs.tracking.runs import using_tracking_uri
from jobs.tracking.vocabulary import LOGGED_MODEL_NAME


class ConvLlavaModel(mlflow.pyfunc.PythonModel):
    """Greedy answers of a ConvLLaVA checkpoint to (image, question) rows."""

    def load_context(self, context) -> None:
        from convllava.modeling.checkpoint import load_model
        from convllava.modeling.inference import GenerationOptions

        config = context.model_config or {}
        path = context.artifacts.get("checkpoint") or config["checkpoint_uri"]
        self.model, self.processor = load_model(path)
        self.options = GenerationOptions(max_new_tokens=int(config.get("max_new_tokens", 64)))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from PIL import Image

        from convllava.modeling.inference import generate

        rows = model_input.to_dict("records")
        images = []
        for i, row in enumerate(rows):
            data = row.get("image") or ""
            try:
                images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") if data else None)
            except Exception as e:
                raise ValueError(f"row {i}: image is not a base64-encoded image file ({e})") from e
        return generate(self.model, self.processor, [str(r["question"]) for r in rows], images, self.options)


def log_model(
    tracking_uri: str, run_id: str, checkpoint: str, example_image: bytes, mode: str = "copy", max_new_tokens: int = 64
) -> ModelInfo:
    """Log `checkpoint` into run `run_id` as an MLflow pyfunc model (signature, input example, our package's pip
    requirements).

    Returns:
        MLflow's `ModelInfo`: `model_uri` (`models:/<model_id>`) and `model_id`, what `register_and_gate` takes.
    """
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from convllava.io.storage import resolve_local

    if mode not in MODES:
        raise ValueError(f"model mode must be one of {MODES}, got {mode!r}")
    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode()], "question": ["What is shown?"]})
    signature = infer_signature(example, ["an answer"])
    artifacts = {"checkpoint": str(resolve_local(checkpoint))} if mode == "copy" else None
    config = {"max_new_tokens": max_new_tokens, **({"checkpoint_uri": checkpoint} if mode == "reference" else {})}
    # Our class is importable from this package, so cloudpickle stores it by reference: MLflow's warning about
    # pickled Python objects does not apply.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in the pipeline's log
    with (
        using_tracking_uri(tracking_uri),
        mlflow.start_run(run_id=run_id),
        warnings.catch_warnings(),
        _quiet("mlflow.pyfunc"),
    ):
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME,
            python_model=ConvLlavaModel(),
            artifacts=artifacts,
            model_config=config,
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(),
        )
    return info


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def example_image() -> bytes:
    """A small PNG (a red disc on white) for the model's input example."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _requirements() -> list[str]:
    """Our package and what it pins (the serving environment installs the same stack)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        return [f"convllava=={version('convllava')}", *[r for r in requires("convllava") or [] if "extra ==" not in r]]
    except PackageNotFoundError:
        return ["torch", "transformers", "timm", "pillow", "pandas"]

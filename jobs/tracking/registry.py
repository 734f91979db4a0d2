"""Model registry: every evaluated model becomes a version with alias `candidate`; it takes `champion` only when
its primary metric beats the current champion's (the decision and both figures are recorded on the version)."""

from __future__ import annotations

from typing import Any

from jobs.tracking.runs import client, using_tracking_uri

METRIC_TAG = "convllava.primary_metric"
VALUE_TAG = "convllava.primary_metric_value"


CHECKPOINT_TAG = "convllava.checkpoint_uri"


def register_and_gate(
    tracking_uri: str,
    name: str,
    model_uri: str,
    run_id: str,
    metric: str,
    value: float,
    higher_is_better: bool = True,
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """Register `model_uri` (an MLflow model's `models:/` URI, or a checkpoint folder) as a new version of `name`
    (alias candidate) and apply the champion gate. `checkpoint_uri`, the checkpoint behind an MLflow model, is
    recorded on the version: what a retrain initialises from."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name, description="ConvLLaVA models trained and evaluated by convllava pipelines")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    tags = {METRIC_TAG: metric, VALUE_TAG: repr(float(value)), CHECKPOINT_TAG: checkpoint_uri or model_uri}
    with using_tracking_uri(tracking_uri):  # a `models:/m-...` source is looked up in the global store
        version = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags).version
    c.set_registered_model_alias(name, "candidate", version)
    champion = current_champion(tracking_uri, name)
    if champion is None:
        better, champion_value, champion_version = True, None, None
    else:
        champion_version, champion_value = champion
        better = value > champion_value if higher_is_better else value < champion_value
    decision = "promoted" if better else "kept the current champion"
    if better:
        c.set_registered_model_alias(name, "champion", version)
    gate = {
        "model": name,
        "version": int(version),
        "metric": metric,
        "candidate_value": float(value),
        "champion_version": int(champion_version) if champion_version else None,
        "champion_value": champion_value,
        "decision": decision,
    }
    for key, val in gate.items():
        c.set_model_version_tag(name, version, f"convllava.gate.{key}", str(val))
    c.set_tag(run_id, "convllava.gate_decision", decision)
    from mlflow.entities import Metric

    metrics = [Metric("gate/candidate", float(value), 0, 0)]
    if champion_value is not None:
        metrics.append(Metric("gate/champion", float(champion_value), 0, 0))
    c.log_batch(run_id, metrics=metrics)
    return gate


def current_champion(tracking_uri: str, name: str) -> tuple[str, float] | None:
    """(version, primary metric value) of the version holding alias `champion`, if any."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client(tracking_uri).get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return mv.version, float(mv.tags[VALUE_TAG])


def champion_source(tracking_uri: str, name: str) -> str | None:
    """The champion's checkpoint URI (what a retrain can start from), if there is a champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client(tracking_uri).get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None
    return version.tags.get(CHECKPOINT_TAG, version.source)

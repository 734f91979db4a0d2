"""Model registry: every evaluated model becomes a version with alias `candidate`; it takes `champion` only when
its primary metric beats the current champion's (the decision and both figures are recorded on the version)."""

from __future__ import annotations

import re
from typing import Any

from jobs.tracking.runs import client, using_tracking_uri
from jobs.tracking.vocabulary import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    GATE_CANDIDATE,
    GATE_CHAMPION,
    TAG_CHECKPOINT_URI,
    TAG_GATE_DECISION,
    TAG_PRIMARY_METRIC,
    TAG_PRIMARY_METRIC_VALUE,
    gate_tag,
)

REGISTERED_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


def register_and_gate(
    tracking_uri: str,
    name: str,
    model_uri: str,
    run_id: str,
    metric: str,
    value: float,
    higher_is_better: bool = True,
    checkpoint_uri: str | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """Register `model_uri` (a logged model's `models:/<model_id>` URI with its `model_id`, or a checkpoint folder)
    as a new version of `name` (alias candidate) and apply the champion gate. `checkpoint_uri`, the checkpoint
    behind an MLflow model, is recorded on the version: what a retrain initialises from.

    A logged model is registered through `create_model_version(..., model_id=...)`, MLflow's public call for it: an
    `mlflow server` refuses a `models:/m-...` source without the id of the model that contains it."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    try:
        c.create_registered_model(name, description="ConvLLaVA models trained and evaluated by convllava pipelines")
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    tags = {
        TAG_PRIMARY_METRIC: metric,
        TAG_PRIMARY_METRIC_VALUE: repr(float(value)),
        TAG_CHECKPOINT_URI: checkpoint_uri or model_uri,
    }
    # A SQL store in this process resolves a `models:/m-...` source through MLflow's global tracking URI (MLflow's
    # own TODO in SqlAlchemyStore.create_model_version); a server resolves it on its side.
    with using_tracking_uri(tracking_uri):
        version = c.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id).version
    c.set_registered_model_alias(name, ALIAS_CANDIDATE, version)
    champion = current_champion(tracking_uri, name)
    if champion is None:
        better, champion_value, champion_version = True, None, None
    else:
        champion_version, champion_value = champion
        better = value > champion_value if higher_is_better else value < champion_value
    decision = "promoted" if better else "kept the current champion"
    if better:
        c.set_registered_model_alias(name, ALIAS_CHAMPION, version)
    gate = {
        "model": name,
        "version": int(version),
        "metric": metric,
        "candidate_value": float(value),
        "champion_version": champion_version,
        "champion_value": champion_value,
        "decision": decision,
    }
    for key, val in gate.items():
        c.set_model_version_tag(name, version, gate_tag(key), str(val))
    c.set_tag(run_id, TAG_GATE_DECISION, decision)
    from mlflow.entities import Metric

    metrics = [Metric(GATE_CANDIDATE, float(value), 0, 0)]
    if champion_value is not None:
        metrics.append(Metric(GATE_CHAMPION, float(champion_value), 0, 0))
    c.log_batch(run_id, metrics=metrics)
    return gate


def current_champion(tracking_uri: str, name: str) -> tuple[int, float] | None:
    """(version, primary metric value) of the version holding alias `champion`, if any. (The version is a number:
    stores in this process give an int, a server's REST API a string.)"""
    from mlflow.exceptions import MlflowException

    try:
        mv = client(tracking_uri).get_model_version_by_alias(name, ALIAS_CHAMPION)
    except MlflowException:
        return None
    return int(mv.version), float(mv.tags[TAG_PRIMARY_METRIC_VALUE])


def champion_source(tracking_uri: str, name: str) -> str | None:
    """The champion's checkpoint URI (what a retrain can start from), if there is a champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client(tracking_uri).get_model_version_by_alias(name, ALIAS_CHAMPION)
    except MlflowException:
        return None
    return version.tags.get(TAG_CHECKPOINT_URI, version.source)


def version_source(tracking_uri: str, uri: str) -> str:
    """The checkpoint behind a registered version, `models:/NAME/VERSION` or `models:/NAME@ALIAS` (what a stage's
    `init_from` may name); a version or alias that does not exist is refused, naming it."""
    from mlflow.exceptions import MlflowException

    found = REGISTERED_VERSION.match(uri)
    if found is None:
        raise ValueError(f"{uri}: a registered model is models:/NAME/VERSION or models:/NAME@ALIAS")
    name, number, alias = found.groups()
    c = client(tracking_uri)
    try:
        version = c.get_model_version(name, number) if number else c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        raise ValueError(f"init_from {uri}: no such registered model version in {tracking_uri} ({e.message})") from None
    return version.tags.get(TAG_CHECKPOINT_URI, version.source)

"""The DAG's three kinds of node (preprocess, stage, eval) as work on one execution skeleton.

A node says what identifies it (its key: a hash of its resolved configuration and of what it consumes), how it
is tagged, when a recorded output is still usable, and how to run; `run_node` does the rest the same way for
every node: reuse a finished run with the same key, else open (or reopen) the node's child run, execute, record
the outcome, and mark the run FAILED when anything goes wrong.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convllava.data.shards import Manifest
from jobs.dag.runbook import NodeOutcome, RunBook, written_rows
from jobs.tracking.runs import log_dataset, log_params
from jobs.tracking.vocabulary import (
    ARTIFACT_CHECKPOINT,
    PREPROCESS_COUNTS,
    TAG_CHECKPOINT_URI,
    TAG_CONFIG_HASH,
    TAG_GATE,
    TAG_INPUT_FINGERPRINT,
    TAG_PARENT_CHECKPOINT,
    TAG_STAGE,
    TRAIN_LOSS,
    WRITTEN,
    manifest_artifact,
    preprocess_metric,
    stage_run_name,
)

if TYPE_CHECKING:
    from jobs.dag.config import PipelineConfig
    from jobs.train.plan import MemoryPlan


def node_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class NodeContext:
    """What a node reads of the execution it runs in; `TrainingDag.run` builds it once, after opening the parent run."""

    config: PipelineConfig
    parent: str  # the execution's parent run id
    tracking_uri: str
    client: Any  # MlflowClient on tracking_uri
    address: str | None  # the Ray cluster; None: the embedded local one
    data_root: Path | str  # a local folder, or an s3:// prefix the data sets' relative paths are under
    shards: dict[str, str]  # data set → where its shards are written
    train_storage: str  # where Ray Train keeps the stages' checkpoints (a folder or s3:// prefix)
    eval_dir: Path  # the eval node's outputs, one folder per key under it
    on_step: Callable[[int, int, dict[str, float]], None]  # a stage's logged steps, for the progress view


@dataclass
class Executed:
    """What a node's work produced: its output URI, the metrics for its run, the figure it is summarised by."""

    output: str
    metrics: dict[str, float] = field(default_factory=dict)
    key_metric: tuple[str, float] | None = None


@dataclass
class NodeWork:
    name: str
    key: str
    tags: dict[str, str]
    execute: Callable[[str], Executed]  # run_id → outcome
    valid: Callable[[str], bool] = lambda output: True


def run_node(runs: RunBook, parent: str, work: NodeWork, force: bool) -> NodeOutcome:
    """Reuse, or run and record, one node (see the module's docstring)."""
    if not force:
        done = runs.reuse(parent, work.name, work.key, work.tags, work.valid)
        if done is not None:
            return done
    run_id = runs.child_run(parent, work.name, work.key, work.tags)
    start = time.time()
    try:
        out = work.execute(run_id)
        runs.finish(run_id, out.metrics, out.output)
    except BaseException:
        runs.client.set_terminated(run_id, "FAILED")
        raise
    return NodeOutcome(work.name, "ran", time.time() - start, out.output, run_id, out.key_metric)


def preprocess_node(ctx: NodeContext) -> tuple[NodeWork, dict[str, str], dict[str, str]]:
    """Ray Data preprocessing of every data set; also returns the shard URIs and input fingerprints by data set."""
    from pipelines.preprocess import fingerprint_mixture, run_preprocess

    pconfig = ctx.config.preprocess_config()
    mixtures = {name: ctx.config.mixture(name, ctx.data_root) for name in sorted(ctx.config.datasets)}
    shards = {name: ctx.shards[name] for name in mixtures}
    fingerprints = {name: fingerprint_mixture(m, pconfig, shards[name], ctx.address) for name, m in mixtures.items()}

    def execute(run_id: str) -> Executed:
        log_params(ctx.tracking_uri, run_id, pconfig.to_dict())
        metrics = {}
        for name, mixture in mixtures.items():
            manifest = run_preprocess(mixture, pconfig, shards[name], address=ctx.address).manifest
            profile = manifest.input_profile()
            annotations = ",".join(s.annotations for s in mixture.sources)
            log_dataset(ctx.tracking_uri, run_id, name, annotations, fingerprints[name][:32], profile, context="raw")
            metrics.update({preprocess_metric(name, k): getattr(manifest, k) for k in PREPROCESS_COUNTS})
            ctx.client.log_text(run_id, json.dumps(manifest.to_dict(), indent=2), manifest_artifact(name))
        written = written_rows(metrics)
        return Executed(",".join(f"{k}={v}" for k, v in shards.items()), metrics, (WRITTEN, written))

    work = NodeWork(
        "preprocess",
        node_key("preprocess", pconfig.to_dict(), fingerprints, shards),
        {TAG_INPUT_FINGERPRINT: node_key(fingerprints), TAG_CONFIG_HASH: pconfig.output_hash()},
        execute,
        valid=lambda _: all(_manifest_matches(shards[n], fingerprints[n]) for n in shards),
    )
    return work, shards, fingerprints


def stage_node(
    ctx: NodeContext,
    node: str,
    shards: dict[str, str],
    fingerprints: dict[str, str],
    init_from: str | None,
    plan: MemoryPlan | None = None,
) -> NodeWork:
    """One training stage on Ray Train; its output is the consolidated model's URI. `plan`: the stage's memory plan
    from the pipeline's preflight, handed to `run_stage` (which logs it and the stage's config into the run)."""
    spec = ctx.config.stages[node]
    stage = ctx.config.stage_config(node, shards[spec.data], init_from)
    key = node_key(node, stage.to_dict(), fingerprints[spec.data])

    def execute(run_id: str) -> Executed:
        from jobs.train.driver import run_stage

        out = run_stage(
            stage,
            ctx.train_storage,
            tracking_uri=ctx.tracking_uri,
            run_id=run_id,
            run_name=stage_run_name(node, key, ctx.parent),
            address=ctx.address,
            on_step=ctx.on_step,
            plan=plan,
        )
        ctx.client.log_text(run_id, json.dumps(checkpoint_reference(out.model_uri), indent=2), ARTIFACT_CHECKPOINT)
        ctx.client.set_tag(run_id, TAG_CHECKPOINT_URI, out.checkpoint_uri)
        loss = out.metrics.get(TRAIN_LOSS)
        return Executed(out.model_uri, key_metric=(TRAIN_LOSS, loss) if loss is not None else None)

    tags = {
        TAG_STAGE: str(stage.stage),
        TAG_CONFIG_HASH: stage.config_hash(),
        TAG_INPUT_FINGERPRINT: fingerprints[spec.data],
        TAG_PARENT_CHECKPOINT: init_from or "",
    }
    return NodeWork(node, key, tags, execute, valid=_still_there)


def eval_node(ctx: NodeContext, model_uri: str, gate: dict[str, Any]) -> NodeWork:
    """Evaluate `model_uri` on the suite, log it as an MLflow model, register it and apply the champion gate.
    The gate decision lands in `gate` (and on the run's and the parent's tags)."""
    ev = ctx.config.eval
    key = node_key("eval", ev.key(), model_uri)

    def execute(run_id: str) -> Executed:
        from jobs.evaluate.suite import run_eval
        from jobs.tracking import registry
        from jobs.tracking.model import example_image, log_model

        max_new_tokens = ev.max_new_tokens
        out = run_eval(
            model_uri,
            ev.suite,
            ctx.eval_dir / key[:12],
            tracking_uri=ctx.tracking_uri,
            run_id=run_id,
            address=ctx.address,
            limit=ev.limit,
            data_root=ev.data_root or str(ctx.data_root),
            max_new_tokens=max_new_tokens,
        )
        primary = ctx.config.primary_metric
        value = out.metrics[primary]
        # The version is an MLflow model (loads with mlflow.pyfunc, serves with `mlflow models serve`), logged
        # into this eval run: from a metric to the model it measured, from the model to its checkpoint.
        logged = log_model(
            ctx.tracking_uri, run_id, model_uri, example_image(), ctx.config.model_mode, max_new_tokens=max_new_tokens
        )
        decision = registry.register_and_gate(
            ctx.tracking_uri,
            ctx.config.registered_model,
            logged.model_uri,
            run_id,
            primary,
            value,
            ctx.config.higher_is_better,
            checkpoint_uri=model_uri,
            model_id=logged.model_id,
        )
        for run in (run_id, ctx.parent):
            ctx.client.set_tag(run, TAG_GATE, json.dumps(decision))
        gate.update(decision)
        return Executed(str(out.output), key_metric=(primary, value))

    tags = {TAG_PARENT_CHECKPOINT: model_uri, TAG_CONFIG_HASH: node_key(ev.key())}
    return NodeWork("eval", key, tags, execute)


def _manifest_matches(shards_uri: str, fingerprint: str) -> bool:
    manifest = Manifest.find(shards_uri)
    return manifest is not None and manifest.input_fingerprint == fingerprint


def _still_there(uri: str) -> bool:
    if not uri or uri.startswith("s3://"):
        return bool(uri)
    return (Path(uri) / "model.safetensors").is_file()


def checkpoint_reference(model_uri: str) -> dict[str, Any]:
    """The checkpoint a stage run produced: its URI and, on a local disk, its size and weights' sha256."""
    ref: dict[str, Any] = {"uri": model_uri}
    if not model_uri.startswith("s3://"):
        weights = Path(model_uri) / "model.safetensors"
        ref["size"] = sum(p.stat().st_size for p in Path(model_uri).rglob("*") if p.is_file())
        h = hashlib.sha256()
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        ref["sha256"] = h.hexdigest()
    return ref

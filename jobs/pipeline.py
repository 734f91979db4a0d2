"""`convllava pipeline run`: preprocess → stage 1 → stage 2 → stage 3 → eval, as plain Python on Ray.

Every node has a key: a hash of its resolved configuration and of what it consumes (the data's input
fingerprint, the upstream checkpoint). MLflow is the record: one parent run per pipeline execution, one child
run per node, tagged with that key. A node whose key already has a FINISHED run is skipped and its recorded
output reused. An execution that was interrupted (driver killed) is resumed by running the same command: its
parent run is picked up again, and each unfinished stage restarts Ray Train under the same run name, which
resumes from the stage's latest checkpoint. `--from NODE` re-runs that node and everything after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs import registry
from jobs.pipeline_config import NODES, PipelineConfig
from jobs.progress import Progress
from jobs.tracking import artifact_root, client, default_tracking_uri, ensure_experiment, log_dataset, log_params

TAG_PIPELINE, TAG_NODE, TAG_KEY, TAG_OUTPUT = (
    "convllava.pipeline",
    "convllava.node",
    "convllava.node_key",
    "convllava.output_uri",
)


class PipelineLocked(RuntimeError):
    """Another `pipeline run` holds this work dir."""


@dataclass
class NodeOutcome:
    node: str
    status: str  # ran | skipped
    seconds: float
    output: str
    run_id: str
    metric: tuple[str, float] | None = None


@dataclass
class PipelineResult:
    ok: bool
    parent_run_id: str
    nodes: list[NodeOutcome] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    experiment_id: str = ""


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextmanager
def workdir_lock(workdir: Path, wait_s: float = 0.0):
    """One pipeline per work dir at a time. `pipeline run` refuses at once (wait_s=0) rather than corrupt a running
    execution; `retrain` waits its turn. The lock is the kernel's (flock), so a killed driver never leaves it held."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".pipeline.lock"
    with open(path, "a+") as f:
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    f.seek(0)
                    raise PipelineLocked(f"{workdir} is in use by another pipeline run ({f.read().strip() or 'unknown pid'}); "
                                         "wait for it to finish or use another --workdir") from None  # fmt: skip
                time.sleep(1.0)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Pipeline:
    def __init__(self, config: PipelineConfig, workdir: Path, tracking_uri: str, address: str | None,
                 progress: Progress | None = None) -> None:  # fmt: skip
        self.config, self.workdir, self.tracking_uri, self.address = config, workdir, tracking_uri, address
        self.progress = progress or Progress(len(NODES))
        self.storage = config.storage or str(workdir)
        self.data_root = Path(config.data_root) if config.data_root else workdir / "data"
        self.client = client(tracking_uri)
        self.experiment_id = ensure_experiment(tracking_uri, config.name, artifact_root(tracking_uri, workdir))

    # ------------------------------------------------------------------ MLflow bookkeeping
    def parent_run(self, fresh: bool) -> str:
        key = self.config.config_hash()
        if not fresh:
            runs = self.client.search_runs([self.experiment_id], filter_string=(
                f"tags.`{TAG_PIPELINE}` = '{self.config.name}' and tags.`convllava.pipeline_key` = '{key}'"),
                order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
            if runs and runs[0].info.status != "FINISHED":
                self.client.update_run(runs[0].info.run_id, status="RUNNING")
                return runs[0].info.run_id  # the interrupted execution continues
        from pipelines.report import code_version

        run = self.client.create_run(self.experiment_id, run_name=f"{self.config.name}",
                                     tags={TAG_PIPELINE: self.config.name, "convllava.pipeline_key": key,
                                           "convllava.code_version": code_version()})  # fmt: skip
        log_params(self.tracking_uri, run.info.run_id, self.config.to_dict())
        self.client.log_text(run.info.run_id, json.dumps(self.config.to_dict(), indent=2), "pipeline_config.json")
        return run.info.run_id

    def finished_run(self, node_key: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{TAG_KEY}` = '{node_key}' and attributes.status = 'FINISHED' and tags.`convllava.skipped` = 'false'"),
            max_results=1)  # fmt: skip
        return runs[0] if runs else None

    def child_run(self, parent: str, node: str, node_key: str, tags: dict[str, str]) -> str:
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{TAG_NODE}` = '{node}' and tags.`{TAG_KEY}` = '{node_key}'"),
            max_results=1)  # fmt: skip
        if runs:
            self.client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
        all_tags = {"mlflow.parentRunId": parent, TAG_PIPELINE: self.config.name, TAG_NODE: node, TAG_KEY: node_key,
                    "convllava.skipped": "false", **tags}  # fmt: skip
        return self.client.create_run(self.experiment_id, run_name=node, tags=all_tags).info.run_id

    def reuse(self, parent: str, node: str, node_key: str, tags: dict[str, str], force: bool,
              valid=lambda output: True) -> NodeOutcome | None:  # fmt: skip
        """The node's recorded outcome when it need not run: finished earlier in this execution (a resumed one),
        or in any earlier execution with the same key (then recorded here as skipped)."""
        if force:
            return None
        own = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{TAG_NODE}` = '{node}' and tags.`{TAG_KEY}` = '{node_key}' "
            "and attributes.status = 'FINISHED'"), max_results=1)  # fmt: skip
        if own and valid(own[0].data.tags.get(TAG_OUTPUT, "")):
            run = own[0]
            metric = _key_metric(node, run.data.metrics, self.config.primary_metric)
            return NodeOutcome(node, "done", 0.0, run.data.tags.get(TAG_OUTPUT, ""), run.info.run_id, metric)
        previous = self.finished_run(node_key)
        if previous is not None and valid(previous.data.tags.get(TAG_OUTPUT, "")):
            return self.record_skip(parent, node, node_key, previous, tags)
        return None

    def record_skip(self, parent: str, node: str, node_key: str, previous, tags: dict[str, str]) -> NodeOutcome:
        run_id = self.child_run(parent, node, node_key, {**tags, "convllava.reused_run_id": previous.info.run_id})
        output = previous.data.tags.get(TAG_OUTPUT, "")
        self.client.set_tag(run_id, "convllava.skipped", "true")
        self.client.set_tag(run_id, TAG_OUTPUT, output)
        self.client.set_terminated(run_id, "FINISHED")
        metric = _key_metric(node, previous.data.metrics, self.config.primary_metric)
        return NodeOutcome(node, "skipped", 0.0, output, run_id, metric)

    # ------------------------------------------------------------------ nodes
    def run(self, from_node: str | None) -> PipelineResult:
        force_from = NODES.index(from_node) if from_node else len(NODES)
        parent = self.parent_run(fresh=from_node is not None)
        result = PipelineResult(ok=False, parent_run_id=parent, experiment_id=self.experiment_id)
        try:
            self.preflight(parent)
            self.ensure_demo_data()
            if self.progress.live:  # one live view: Ray Data's own bars would fight it for the line
                import ray.data
                from ray.util.debug import log_once

                ray.data.DataContext.get_current().enable_progress_bars = False
                log_once("ray_data_progress_manager_disabled")  # taken: Ray Data's "Progress bars disabled" warning
            with self._shown(result, "preprocess"):
                shards, fingerprints = self.node_preprocess(parent, result, force=force_from <= 0)
            self.client.set_tag(parent, "convllava.raw_fingerprint", _key(fingerprints))
            init = self._champion_model() if self.config.init_from_champion else None
            for i, node in enumerate(("stage1", "stage2", "stage3"), start=1):
                with self._shown(result, node):
                    init = self.node_stage(parent, result, node, shards, fingerprints, init, force=force_from <= i)
            with self._shown(result, "eval"):
                self.node_eval(parent, result, init, force=force_from <= 4)
            result.ok = True
        finally:
            # The parent run's description (MLflow's note): what ran, how long, the key figures, the gate.
            self.client.set_tag(parent, "mlflow.note.content", describe(self.config.name, result))
            self.client.set_terminated(parent, "FINISHED" if result.ok else "FAILED")
        return result

    @contextmanager
    def _shown(self, result: PipelineResult, node: str):
        """A node's span in the progress view, ended with the outcome the node appended to `result`."""
        with self.progress.node(NODES.index(node) + 1, node):
            yield
            n = result.nodes[-1]
            self.progress.finished(n.status, n.seconds, n.metric)

    def preflight(self, parent: str) -> None:
        """Every stage's memory plan before the first image is read: a stage that cannot fit its GPUs stops the
        pipeline now, not after preprocessing and the stages before it. Shards that do not exist yet are planned at
        the preprocess config's resolution and max_length; stages 2 and 3 have stage 1's architecture. Each plan
        goes into the parent run (`STAGE/plan/...`, `STAGE/plan.txt`); `run_stage` plans again on the real shards."""
        from jobs.plan import preflight

        pconfig = self.config.preprocess_config()
        assumed = (pconfig.max_length, (pconfig.resolution, pconfig.resolution))
        first = None
        for node in ("stage1", "stage2", "stage3"):
            spec = self.config.stages[node]
            init = self._champion_model() if node == "stage1" and self.config.init_from_champion else None
            stage = self.config.stage_config(node, f"{self.storage.rstrip('/')}/shards/{spec.data}", init)
            first = first or stage
            if stage.init_from is None and stage.preset is None:
                stage = stage.replace(init_from=first.init_from, preset=first.preset)
            preflight(stage, self.tracking_uri, parent, assumed=assumed, prefix=f"{node}/")

    def ensure_demo_data(self) -> None:
        spec = self.config.demo_data
        if not spec:
            return
        meta = self.data_root / "metadata.json"
        if meta.is_file() and json.loads(meta.read_text()).get("seed") == spec.get("seed", 0):
            return
        from pipelines.demo_data import generate_demo_data

        generate_demo_data(self.data_root, seed=spec.get("seed", 0), n_caption=spec.get("captions", 1200),
                           n_instruct=spec.get("instruct", 1200), n_eval=spec.get("eval", 200))  # fmt: skip

    def node_preprocess(
        self, parent: str, result: PipelineResult, force: bool
    ) -> tuple[dict[str, str], dict[str, str]]:
        from pipelines.preprocess import fingerprint_mixture, run_preprocess

        pconfig = self.config.preprocess_config()
        mixtures = {name: self.config.mixture(name, self.data_root) for name in sorted(self.config.datasets)}
        fingerprints = {name: fingerprint_mixture(m, pconfig) for name, m in mixtures.items()}
        shards = {name: f"{self.storage.rstrip('/')}/shards/{name}" for name in mixtures}
        key = _key("preprocess", pconfig.to_dict(), fingerprints, shards)
        tags = {"convllava.input_fingerprint": _key(fingerprints), "convllava.config_hash": pconfig.output_hash()}
        done = self.reuse(parent, "preprocess", key, tags, force,
                          valid=lambda _: all(self._manifest_matches(shards[n], fingerprints[n]) for n in shards))  # fmt: skip
        if done is not None:
            result.nodes.append(done)
            return shards, fingerprints
        run_id = self.child_run(parent, "preprocess", key, tags)
        start = time.time()
        try:
            log_params(self.tracking_uri, run_id, pconfig.to_dict())
            metrics = {}
            for name, mixture in mixtures.items():
                manifest = run_preprocess(mixture, pconfig, shards[name], address=self.address).manifest
                profile = {"read": manifest["read"], "sources": manifest["sources"]}
                log_dataset(self.tracking_uri, run_id, name, ",".join(s.annotations for s in mixture.sources),
                            fingerprints[name][:32], profile, context="raw")  # fmt: skip
                metrics.update({f"{name}/{k}": manifest[k] for k in ("read", "written", "quarantined")})
                self.client.log_text(run_id, json.dumps(manifest, indent=2), f"manifests/{name}.json")
            self._finish(run_id, metrics, ",".join(f"{k}={v}" for k, v in shards.items()))
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        written = sum(v for k, v in metrics.items() if k.endswith("/written"))
        result.nodes.append(NodeOutcome("preprocess", "ran", time.time() - start, ",".join(shards.values()), run_id,
                                        ("written", written)))  # fmt: skip
        return shards, fingerprints

    def _manifest_matches(self, shards_uri: str, fingerprint: str) -> bool:
        from pipelines.store import OutputStore

        raw = OutputStore(shards_uri).read_bytes("manifest.json")
        return raw is not None and json.loads(raw)["input_fingerprint"] == fingerprint

    def node_stage(self, parent, result, node, shards, fingerprints, init_from, force: bool) -> str:
        from jobs.train import run_stage

        spec = self.config.stages[node]
        stage = self.config.stage_config(node, shards[spec.data], init_from)
        key = _key(node, stage.to_dict(), fingerprints[spec.data])
        tags = {"convllava.stage": str(stage.stage), "convllava.config_hash": stage.config_hash(),
                "convllava.input_fingerprint": fingerprints[spec.data], "convllava.parent_checkpoint": init_from or ""}  # fmt: skip
        done = self.reuse(parent, node, key, tags, force, valid=_still_there)
        if done is not None:
            result.nodes.append(done)
            return done.output
        run_id = self.child_run(parent, node, key, tags)
        start = time.time()
        try:
            log_params(self.tracking_uri, run_id, stage.to_dict())
            self.client.log_text(run_id, stage.to_yaml(), "stage_config.yaml")
            out = run_stage(stage, f"{self.storage.rstrip('/')}/runs", tracking_uri=self.tracking_uri, run_id=run_id,
                            run_name=f"{node}-{key[:10]}-{parent[:8]}", address=self.address,
                            on_step=self.progress.step)  # fmt: skip
            self.client.log_text(run_id, json.dumps(_checkpoint_reference(out.model_uri), indent=2), "checkpoint.json")
            self.client.set_tag(run_id, "convllava.checkpoint_uri", out.checkpoint_uri)
            self._finish(run_id, {}, out.model_uri)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        loss = out.metrics.get("train/loss")
        result.nodes.append(NodeOutcome(node, "ran", time.time() - start, out.model_uri, run_id,
                                        ("train/loss", loss) if loss is not None else None))  # fmt: skip
        return out.model_uri

    def node_eval(self, parent: str, result: PipelineResult, model_uri: str, force: bool) -> None:
        from jobs.evaluate import run_eval
        from jobs.mlflow_model import example_image, log_model

        ev = self.config.eval
        key = _key("eval", ev, model_uri)
        tags = {"convllava.parent_checkpoint": model_uri, "convllava.config_hash": _key(ev)}
        done = self.reuse(parent, "eval", key, tags, force)
        if done is not None:
            result.nodes.append(done)
            source = self.client.get_run(done.run_id).data.tags
            source = (
                self.client.get_run(source["convllava.reused_run_id"]).data.tags
                if "convllava.reused_run_id" in source
                else source
            )
            result.gate = json.loads(source.get("convllava.gate", "{}"))
            return
        run_id = self.child_run(parent, "eval", key, tags)
        start = time.time()
        try:
            out = run_eval(model_uri, ev["suite"], self.workdir / "eval" / key[:12], tracking_uri=self.tracking_uri,
                           run_id=run_id, address=self.address, limit=ev.get("limit"),
                           data_root=ev.get("data_root") or str(self.data_root),
                           max_new_tokens=ev.get("max_new_tokens", 32))  # fmt: skip
            value = out.metrics[self.config.primary_metric]
            # The version is an MLflow model (loads with mlflow.pyfunc, serves with `mlflow models serve`), logged
            # into this eval run: from a metric to the model it measured, from the model to its checkpoint.
            mlflow_model = log_model(self.tracking_uri, run_id, model_uri, example_image(), self.config.model_mode,
                                     max_new_tokens=ev.get("max_new_tokens", 32))  # fmt: skip
            gate = registry.register_and_gate(self.tracking_uri, self.config.registered_model, mlflow_model, run_id,
                                              self.config.primary_metric, value, self.config.higher_is_better,
                                              checkpoint_uri=model_uri)  # fmt: skip
            self.client.set_tag(run_id, "convllava.gate", json.dumps(gate))
            self.client.set_tag(parent, "convllava.gate", json.dumps(gate))
            self._finish(run_id, {}, str(out.output))
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        result.gate = gate
        result.nodes.append(NodeOutcome("eval", "ran", time.time() - start, str(out.output), run_id,
                                        (self.config.primary_metric, value)))  # fmt: skip

    def _champion_model(self) -> str | None:
        return registry.champion_source(self.tracking_uri, self.config.registered_model)

    def _finish(self, run_id: str, metrics: dict[str, float], output: str) -> None:
        from mlflow.entities import Metric

        if metrics:
            now = int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self.client.set_tag(run_id, TAG_OUTPUT, output)
        self.client.set_terminated(run_id, "FINISHED")


def raw_fingerprint(config: PipelineConfig, data_root: Path) -> str:
    """One hash over every data set's input fingerprint (records + image fingerprints), as the parent run records."""
    from pipelines.preprocess import fingerprint_mixture

    pconfig = config.preprocess_config()
    return _key(
        {name: fingerprint_mixture(config.mixture(name, data_root), pconfig) for name in sorted(config.datasets)}
    )


def _still_there(uri: str) -> bool:
    if not uri or uri.startswith("s3://"):
        return bool(uri)
    return (Path(uri) / "model.safetensors").is_file()


def _checkpoint_reference(model_uri: str) -> dict[str, Any]:
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


def _key_metric(node: str, metrics: dict[str, float], primary: str = "") -> tuple[str, float] | None:
    """The figure `pipeline status` shows: final loss for stages, the primary metric for eval, rows written."""
    wanted = {"eval": f"eval/{primary}".replace("@", "_at_")}.get(node, "train/loss")
    if wanted in metrics:
        return wanted, metrics[wanted]
    written = sum(v for k, v in metrics.items() if k.endswith("/written"))
    return ("written", written) if node == "preprocess" and written else None


def _accuracy_table(metrics: dict[str, float]) -> str:
    """Per question type: accuracy next to chance (the demo suite's `BENCH/TYPE/accuracy` and `/chance`)."""
    rows = [f"{'eval metric':28s} {'value':>8s} {'chance':>8s}"]
    for name, value in sorted(metrics.items()):
        if name.endswith("/chance"):
            continue
        chance = metrics.get(name.removesuffix("/accuracy") + "/chance")  # TYPE/accuracy → TYPE/chance, overall
        rows.append(f"{name:28s} {value:8.3f} {'' if chance is None else f'{chance:8.3f}'}")
    return "\n".join(rows)


def describe(name: str, result: PipelineResult) -> str:
    """The pipeline execution in markdown: one row per node (status, time, key metric) and the gate decision."""
    lines = [f"**{name}** — {'finished' if result.ok else 'failed'}", "", "| node | status | time | key metric |",
             "|---|---|---|---|"]  # fmt: skip
    for n in result.nodes:
        metric = f"{n.metric[0]} = {n.metric[1]:.4f}" if n.metric else ""
        lines.append(f"| {n.node} | {n.status} | {n.seconds:.1f} s | {metric} |")
    done = {n.node for n in result.nodes}
    lines += [f"| {node} | not reached | | |" for node in NODES if node not in done]
    if result.gate:
        g = result.gate
        champion = (
            f"version {g['champion_version']} ({g['champion_value']:.4f})" if g.get("champion_version") else "none"
        )
        lines += ["", f"**gate** on `{g['metric']}`: candidate version {g['version']} = {g['candidate_value']:.4f}, "
                  f"champion before: {champion} → **{g['decision']}**"]  # fmt: skip
    return "\n".join(lines)


def _summary(result: PipelineResult, tracking_uri: str) -> str:
    lines = [f"{'node':11s} {'status':8s} {'time':>8s}  key metric", "-" * 60]
    for n in result.nodes:
        metric = f"{n.metric[0]} = {n.metric[1]:.4f}" if n.metric else ""
        lines.append(f"{n.node:11s} {n.status:8s} {n.seconds:7.1f}s  {metric}")
    evaluated = next((n for n in result.nodes if n.node == "eval"), None)
    if evaluated is not None and (Path(evaluated.output) / "metrics.json").is_file():
        lines += ["", _accuracy_table(json.loads((Path(evaluated.output) / "metrics.json").read_text()))]
    if result.gate:
        g = result.gate
        lines += ["", f"registered {g['model']} version {g['version']} as candidate; champion: {g['decision']}"]
    # MLflow 3.17's UI opens an experiment in its GenAI view unless the browser chose "Model training" (it ignores
    # the experiment's kind tag); this link chooses it.
    page = f"#/experiments/{result.experiment_id}?workflowType=machine_learning"
    if tracking_uri.startswith("sqlite:"):
        lines += ["", f"browse the runs: mlflow ui --backend-store-uri {tracking_uri}"]
        lines.append(f"                 then open http://127.0.0.1:5000/{page}")
    elif tracking_uri.startswith("http"):
        lines += ["", f"browse the runs: {tracking_uri.rstrip('/')}/{page}"]
    if result.gate:
        lines += [f"serve the champion: MLFLOW_TRACKING_URI={tracking_uri} mlflow models serve "
                  f"-m models:/{result.gate['model']}@champion --env-manager local -p 5001"]  # fmt: skip
    return "\n".join(lines)


def run_pipeline(config_path: str, workdir: str = "work/pipeline", tracking_uri: str | None = None,
                 from_node: str | None = None, address: str | None = None,
                 progress: Progress | None = None) -> PipelineResult:  # fmt: skip
    """Run (or resume) the pipeline. `progress` shows it (default: none; the CLI passes `progress_for(...)`)."""
    config = PipelineConfig.from_yaml(config_path)
    wd = Path(workdir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(wd)
    with workdir_lock(wd):
        result = Pipeline(config, wd, tracking_uri, address, progress).run(from_node)
    result.summary = _summary(result, tracking_uri)
    return result


def pipeline_status(config_path: str, workdir: str = "work/pipeline", tracking_uri: str | None = None) -> str:
    """Each node of the latest execution: state, duration and key metric, from MLflow."""
    config = PipelineConfig.from_yaml(config_path)
    wd = Path(workdir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(wd)
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(config.name)
    parents = [] if exp is None else c.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{TAG_PIPELINE}` = '{config.name}' and tags.`convllava.pipeline_key` != ''"),
        order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    parents = [p for p in parents if TAG_NODE not in p.data.tags]
    if not parents:
        return f"pipeline {config.name}: no runs in {tracking_uri}"
    parent = parents[0]
    children = {r.data.tags.get(TAG_NODE): r for r in c.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}  # fmt: skip
    lines = [f"pipeline {config.name}, run {parent.info.run_id} ({parent.info.status})",
             f"{'node':11s} {'state':10s} {'duration':>9s}  key metric"]  # fmt: skip
    for node in NODES:
        r = children.get(node)
        if r is None:
            lines.append(f"{node:11s} {'pending':10s} {'':>9s}")
            continue
        state = "skipped" if r.data.tags.get("convllava.skipped") == "true" else r.info.status.lower()
        end = r.info.end_time or int(time.time() * 1000)
        metric = _key_metric(node, r.data.metrics, config.primary_metric)
        if metric is None and r.data.tags.get("convllava.reused_run_id"):
            reused = c.get_run(r.data.tags["convllava.reused_run_id"])
            metric = _key_metric(node, reused.data.metrics, config.primary_metric)
        shown = f"{metric[0]} = {metric[1]:.4f}" if metric else ""
        lines.append(f"{node:11s} {state:10s} {(end - r.info.start_time) / 1000:8.1f}s  {shown}")
    return "\n".join(lines)

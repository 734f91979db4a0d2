"""`convllava pipeline run`: preprocess → the config's stages in order → eval, as plain Python on Ray.

Every node has a key: a hash of its resolved configuration and of what it consumes (the data's input
fingerprint, the upstream checkpoint). MLflow is the record: one parent run per execution, one child run per
node, tagged with that key. A node whose key already has a FINISHED run is skipped and its recorded output
reused. An execution that was interrupted (driver killed) is resumed by running the same command: its parent
run is picked up again, and each unfinished stage restarts Ray Train under the same run name, which resumes from
the stage's latest checkpoint. `--from NODE` re-runs that node and everything after it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from convllava.io.storage import is_s3
from jobs.dag.config import PipelineConfig
from jobs.dag.nodes import NodeContext, eval_node, node_key, preprocess_node, run_node, stage_node
from jobs.dag.report import describe, summary
from jobs.dag.runbook import NodeOutcome, RunBook
from jobs.progress import Progress
from jobs.tracking.runs import default_tracking_uri, ensure_experiment
from jobs.tracking.vocabulary import TAG_GATE, TAG_NOTE, TAG_RAW_FINGERPRINT

if TYPE_CHECKING:
    from jobs.train.plan import MemoryPlan


class PipelineLocked(RuntimeError):
    """Another `pipeline run` holds this work dir."""


@dataclass
class PipelineResult:
    ok: bool
    parent_run_id: str
    planned: tuple[str, ...] = ()  # the DAG's nodes in order
    nodes: list[NodeOutcome] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    experiment_id: str = ""


@contextmanager
def workdir_lock(workdir: Path, wait_s: float = 0.0):
    """One pipeline per work dir at a time. `pipeline run` refuses at once (wait_s=0) rather than corrupt a running
    execution; `retrain` waits its turn. The lock is the kernel's (flock, through filelock's `FileLock`), so a killed
    driver never leaves it held; the lock file names the holder's pid.

    Raises:
        PipelineLocked: another pipeline still holds the work dir after `wait_s` seconds.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / ".pipeline.lock"

    def name_holder(fd: int) -> None:  # filelock truncates the file once it holds the lock, never before
        os.write(fd, f"pid {os.getpid()}".encode())

    # on_acquired also keeps filelock from falling back to a lock file that outlives a killed holder (no flock)
    lock = FileLock(path, timeout=wait_s, poll_interval=1.0, on_acquired=name_holder)
    try:
        lock.acquire()
    except Timeout:
        holder = path.read_text().strip() or "unknown pid"
        raise PipelineLocked(
            f"{workdir} is in use by another pipeline run ({holder}); wait for it to finish or use another --workdir"
        ) from None
    try:
        yield
    finally:
        lock.release()


class TrainingDag:
    """One pipeline config executed in one work dir: runs the nodes in order, each through `run_node`, and keeps
    the execution's parent run, progress view and gate decision."""

    def __init__(
        self,
        config: PipelineConfig,
        workdir: Path,
        tracking_uri: str,
        address: str | None,
        progress: Progress | None = None,
    ) -> None:
        self.config, self.workdir, self.tracking_uri, self.address = config, workdir, tracking_uri, address
        self.progress = progress or Progress(len(config.nodes))
        self.storage = config.storage or str(workdir)
        # a local folder, or an s3:// prefix the data sets' relative paths are under
        self.data_root: Path | str = (
            config.data_root
            if config.data_root and is_s3(config.data_root)
            else Path(config.data_root or workdir / "data")
        )
        experiment_id = ensure_experiment(tracking_uri, config.name)
        self.runs = RunBook(tracking_uri, experiment_id, config.name, config.primary_metric)
        self.parent = ""

    def storage_uri(self, *parts: str) -> str:
        return "/".join([self.storage.rstrip("/"), *parts])

    def shards_uri(self, dataset: str) -> str:
        return self.storage_uri("shards", dataset)

    def run(self, from_node: str | None) -> PipelineResult:
        from pipelines.report import code_version

        nodes = self.config.nodes
        force_from = self.config.node(from_node) if from_node else len(nodes)
        self.parent = self.runs.parent_run(
            self.config.config_hash(),
            fresh=from_node is not None,
            params=self.config.to_dict(),
            code_version=code_version(),
        )
        result = PipelineResult(False, self.parent, nodes, experiment_id=self.runs.experiment_id)
        client = self.runs.client
        ctx = self.node_context()
        try:
            plans = self.preflight()
            self.ensure_demo_data()
            if self.progress.live:  # one live view: Ray Data's own bars would fight it for the line
                import ray.data
                from ray.util.debug import log_once

                ray.data.DataContext.get_current().enable_progress_bars = False
                log_once("ray_data_progress_manager_disabled")  # taken: Ray Data's "Progress bars disabled" warning
            work, shards, fingerprints = preprocess_node(ctx)
            self._run(result, work, force_from <= 0)
            client.set_tag(self.parent, TAG_RAW_FINGERPRINT, node_key(fingerprints))
            init = self._champion_model() if self.config.init_from_champion else None
            for i, (node, spec) in enumerate(self.config.stages.items(), start=1):
                init = self.init_source(spec.init_from) if spec.init_from else init  # else the previous stage's
                stage = stage_node(ctx, node, shards, fingerprints, init, plans[node])
                init = self._run(result, stage, force_from <= i).output
            done = self._run(result, eval_node(ctx, init, result.gate), force_from <= len(nodes) - 1)
            if done.status != "ran":
                result.gate = json.loads(self.runs.source_tags(done.run_id).get(TAG_GATE, "{}"))
            result.ok = True
        finally:
            # The parent run's description (MLflow's note): what ran, how long, the key figures, the gate.
            client.set_tag(self.parent, TAG_NOTE, describe(self.config.name, result))
            client.set_terminated(self.parent, "FINISHED" if result.ok else "FAILED")
        return result

    def _run(self, result: PipelineResult, work, force: bool) -> NodeOutcome:
        """One node, shown in the progress view and appended to `result`."""
        with self.progress.node(self.config.nodes.index(work.name) + 1, work.name):
            outcome = run_node(self.runs, self.parent, work, force)
            result.nodes.append(outcome)
            self.progress.finished(outcome.status, outcome.seconds, outcome.metric)
        return outcome

    def node_context(self) -> NodeContext:
        """What this execution's nodes read: made once per `run`, when the parent run is open."""
        return NodeContext(
            config=self.config,
            parent=self.parent,
            tracking_uri=self.tracking_uri,
            client=self.runs.client,
            address=self.address,
            data_root=self.data_root,
            shards={name: self.shards_uri(name) for name in self.config.datasets},
            train_storage=self.storage_uri("runs"),
            eval_dir=self.workdir / "eval",
            on_step=self.progress.step,
        )

    def preflight(self) -> dict[str, MemoryPlan]:
        """Every stage's memory plan, by stage, before the first image is read: a stage that cannot fit its GPUs stops
        the pipeline now, not after preprocessing and the stages before it. Shards that do not exist yet are planned
        at the preprocess config's resolution and max_length; a stage that starts from
        the one before it has that stage's architecture. Each plan goes into the parent run (`STAGE/plan/...`,
        `STAGE/plan.txt`) and is handed to its stage, whose run logs it: a stage is planned once per execution."""
        from jobs.train.preflight import preflight

        pconfig = self.config.preprocess_config()
        assumed = (pconfig.max_length, (pconfig.resolution, pconfig.resolution))
        before = None
        plans = {}
        for i, (node, spec) in enumerate(self.config.stages.items()):
            init = self._champion_model() if i == 0 and self.config.init_from_champion else None
            init = self.init_source(spec.init_from) if spec.init_from else init
            stage = self.config.stage_config(node, self.shards_uri(spec.data), init)
            if stage.init_from is None and stage.preset is None and before is not None:
                stage = stage.replace(init_from=before.init_from, preset=before.preset)
            plans[node] = preflight(stage, self.tracking_uri, self.parent, assumed=assumed, prefix=f"{node}/")
            before = stage
        return plans

    def ensure_demo_data(self) -> None:
        spec = self.config.demo_data
        if not spec:
            return
        meta = self.data_root / "metadata.json"
        if meta.is_file() and json.loads(meta.read_text()).get("seed") == spec.seed:
            return
        spec.generate(self.data_root)

    def init_source(self, init_from: str) -> str:
        """A stage's `init_from` as a checkpoint URI: a registered version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`)
        becomes the checkpoint recorded on it; a path or `s3://` URI is used as written."""
        from jobs.tracking import registry

        if not registry.REGISTERED_VERSION.match(init_from):
            return init_from
        return registry.version_source(self.tracking_uri, init_from)

    def _champion_model(self) -> str | None:
        from jobs.tracking import registry

        return registry.champion_source(self.tracking_uri, self.config.registered_model)


def raw_fingerprint(dag: TrainingDag) -> str:
    """One hash over every data set's input fingerprint (records + image fingerprints), as the parent run records;
    computed on the DAG's cluster, in a work folder under each data set's shard location."""
    from pipelines.preprocess import fingerprint_mixture

    config = dag.config
    pconfig = config.preprocess_config()
    return node_key(
        {
            name: fingerprint_mixture(config.mixture(name, dag.data_root), pconfig, dag.shards_uri(name), dag.address)
            for name in sorted(config.datasets)
        }
    )


def run_pipeline(
    config_path: str,
    workdir: str = "work/pipeline",
    tracking_uri: str | None = None,
    from_node: str | None = None,
    address: str | None = None,
    progress: Progress | None = None,
) -> PipelineResult:
    """Run (or resume) the pipeline. `progress` shows it (default: none; the CLI passes `progress_for(...)`)."""
    config = PipelineConfig.from_yaml(config_path)
    wd = Path(workdir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(wd)
    with workdir_lock(wd):
        result = TrainingDag(config, wd, tracking_uri, address, progress).run(from_node)
    result.summary = summary(result, tracking_uri)
    return result

"""`convllava train`: run one stage as a Ray Train `TorchTrainer` job with DeepSpeed on every worker.

The driver resolves the config, creates (or reuses) the MLflow run and logs the resolved config, starts the
trainer with a `FailureConfig` (a killed worker restarts the group from the latest checkpoint) and returns the
verified, consolidated checkpoint's URI — the only thing the next stage needs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convllava.io.storage import is_s3, read_bytes, s3_filesystem
from jobs.progress import StepFeed
from jobs.tracking.vocabulary import ARTIFACT_STAGE_CONFIG, DEFAULT_EXPERIMENT, TAG_CONFIG_HASH, TAG_STAGE
from jobs.train.config import StageConfig
from jobs.train.interfaces import StageResult
from jobs.train.strategy import DeepSpeedStrategy
from pipelines.ray_runtime import adopt_secrets, alive_nodes, ensure_ray, share_secrets, worker_runtime_env

if TYPE_CHECKING:
    from jobs.train.plan import MemoryPlan

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL_S = 5.0
# Rank 0 logs through MLflow's async queue, but its setup calls and its final flush wait on MLflow, and a batch the
# queue could not send is re-sent only once MLflow gives up on it: by default one request to a down server retries
# for about four minutes. Workers get short requests unless the user set them.
WORKER_MLFLOW_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # Ray Train copies every print into its logger as well, so each line reached the screen twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class RayTrainCheckpoints:
    """The recipe's checkpoint sink on a Ray Train worker: each rank reports its part; Ray Train uploads it into the
    run's storage (`upload_checkpoint` checks it arrived whole) and the controller registers the checkpoint once
    every rank has reported: what a restarted worker group, or a rerun under the same run name, resumes from."""

    def publish(self, directory: Path, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(
            {**metrics, "step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
            checkpoint_dir_name=f"checkpoint_{step:06d}",
            checkpoint_upload_fn=upload_checkpoint,
        )


def upload_checkpoint(checkpoint, checkpoint_dir_name: str):
    """Ray Train's own upload of this rank's part of a checkpoint, then a check that every file arrived whole.

    pyarrow's `copy_files` (what Ray uploads with) ignores the error of a file whose S3 upload failed after all
    retries ("Error ignored when destroying file"): the file is silently missing, and Ray would record the checkpoint
    as complete. Raising here fails the report instead, so the checkpoint is never recorded.

    Raises:
        CheckpointIncomplete: naming the files missing or short in storage.
    """
    import ray.train

    from convllava.io.storage import listing
    from jobs.train.checkpoints import CheckpointIncomplete

    persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, checkpoint_dir_name)
    stored = {rel: info.size for rel, info in listing(persisted.filesystem, persisted.path).items()}
    local = Path(checkpoint.path)
    written = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
    lost = sorted(rel for rel, size in written.items() if stored.get(rel) != size)
    if lost:
        raise CheckpointIncomplete(f"{checkpoint_dir_name}: uploading to {persisted.path} lost {lost}; not recorded")
    return persisted


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    entered = time.time()
    import psutil
    import ray.train

    # DeepSpeed's ZeRO calls torch.distributed's all_gather_into_tensor / reduce_scatter_tensor, which this torch
    # deprecates: one FutureWarning per call, hundreds of lines per stage in the driver's output and nothing to act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    adopt_secrets(loop_config["secrets"])  # before anything reads credentials
    import torch

    if not torch.cuda.is_available():  # said, so DeepSpeed does not warn on every worker that it detected none
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train.torch

    from jobs.private_apis import quiet_train_report_log
    from jobs.progress import FeedMetrics
    from jobs.tracking.runs import MetricLogger
    from jobs.train.recipe import StageRecipe

    quiet_train_report_log()  # Ray Train's "Reporting training result ..." INFO line per checkpoint and rank

    ctx = ray.train.get_context()
    # The config travels as plain data: Ray Train's controller unpickles the loop config too, and a StageConfig
    # object would make it import convllava (torch, transformers, timm) before it starts any worker.
    config = StageConfig.from_dict(loop_config["stage"])
    # Where the start-up went (`jobs.train.recipe.startup_metrics`): the driver's marks, then this process's.
    marks = [*loop_config["startup"], ("worker_start", psutil.Process().create_time()), ("worker_init", entered)]
    run = loop_config["run"]
    rank = ctx.get_world_rank()
    logger = None
    if rank == 0 and run.get("tracking_uri") and run.get("run_id"):
        logger = MetricLogger(run["tracking_uri"], run["run_id"])
    if rank == 0 and loop_config.get("steps") is not None:  # the driver's progress view follows the logged steps
        logger = FeedMetrics(logger, loop_config["steps"], total=lambda: recipe.total_steps)
    recipe = StageRecipe(
        config,
        rank,
        ctx.get_world_size(),
        checkpoints=RayTrainCheckpoints(),
        metrics=logger,
        run_id=run.get("run_id"),
        device=ray.train.torch.get_device(),
        startup=marks,
        node=ray.get_runtime_context().get_node_id(),
    )
    monitor = system_metrics(run, ctx) if ctx.get_local_rank() == 0 else None
    try:
        recipe.setup(resume_point(ctx, ray.train.torch.get_device()))
        recipe.train()
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)


def resume_point(ctx, device):
    """The checkpoint this worker group resumes from: the newest one complete in the run's storage (every rank's
    marker, every file at its size), whether or not Ray Train's controller registered it (a failure in the second
    between the last upload and the registration lost it), else the one Ray Train hands back, else none. Rank 0
    chooses and the others take its step, so every rank restores the same one, read in place (no download)."""
    import ray.train
    import torch

    from jobs.train.checkpoints import TRAINER_STATE, StoredCheckpoint, newest_complete
    from jobs.train.device import DeviceCollectives

    storage = ctx.get_storage()
    fs, run_root = storage.storage_filesystem, storage.experiment_fs_path
    step = -1.0
    if ctx.get_world_rank() == 0:
        found = newest_complete(fs, run_root)
        registered = ray.train.get_checkpoint()
        if found is not None:
            step = float(found[1]["step"])
            if registered is None or registered.path.rstrip("/") != found[0].rstrip("/"):
                print(f"resuming from {found[0]}, complete in storage (Ray Train's latest: {registered})", flush=True)
        elif registered is not None:
            step = float(StoredCheckpoint(registered.path, registered.filesystem).json(TRAINER_STATE)["step"])
    (step,) = DeviceCollectives(torch.device(device)).max([step])
    if step < 0:
        return None
    return StoredCheckpoint(f"{run_root.rstrip('/')}/checkpoint_{int(step):06d}", fs)


def system_metrics(run: dict[str, Any], ctx):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of this worker's node, into the
    stage's run every `SYSTEM_METRICS_INTERVAL_S` (`system/...`, `system/node_K/...` when the stage spans nodes),
    sampled by one worker per node. Never stops training: a tracking server that is down costs a warning."""
    if not (run.get("tracking_uri") and run.get("run_id")):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop INFO lines, per stage

    spans_nodes = ctx.get_world_size() > ctx.get_local_world_size()
    try:
        monitor = SystemMetricsMonitor(
            run["run_id"],
            sampling_interval=SYSTEM_METRICS_INTERVAL_S,
            resume_logging=True,
            node_id=f"node_{ctx.get_node_rank()}" if spans_nodes else None,
            tracking_uri=run["tracking_uri"],
        )
        monitor.start()
    except Exception as e:  # noqa: BLE001 - monitoring must never stop training
        log.warning("system metrics not recorded for run %s: %s", run["run_id"], e)
        return None
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor and send what it sampled since its last publish (MLflow's `finish` drops it, so a stage
    shorter than one interval would show nothing)."""
    monitor.finish()
    try:
        if metrics := monitor.aggregate_metrics():
            monitor.publish_metrics(metrics)
            monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - monitoring must never fail a finished stage
        log.warning("last system metrics not recorded: %s", e)


def log_stage_config(config: StageConfig, tracking_uri: str, run_id: str) -> None:
    """The stage's resolved config into its run: every field as a param, and the YAML `train --config` takes
    (`stage_config.yaml`). `run_stage` calls it once, for `convllava train` and for a pipeline's stage alike."""
    from jobs.tracking.runs import client, log_params

    log_params(tracking_uri, run_id, config.to_dict())
    client(tracking_uri).log_text(run_id, config.to_yaml(), ARTIFACT_STAGE_CONFIG)


def log_stage_data(config: StageConfig, tracking_uri: str, run_id: str) -> None:
    """The stage's shards as the run's training dataset (source = the shard folder or `s3://` prefix, digest = the
    shards' fingerprint, the manifest's counts as its profile): only the manifest is read."""
    from convllava.data.shards import Manifest
    from jobs.tracking.runs import log_dataset

    manifest = Manifest.find(config.data)
    if manifest is None:  # the workers' ShardSet says why
        return
    name = config.data.rstrip("/").rsplit("/", 1)[-1]
    digest = manifest.fingerprint.split("-")[-1]
    log_dataset(tracking_uri, run_id, name, config.data, digest, manifest.profile(), context="training")


def storage_for(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: a local folder, or an `s3://` prefix through pyarrow."""
    if not is_s3(uri):
        path = Path(uri).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    # Ray Train pickles this filesystem into its controller, which gets no shared secrets: the keys travel inside.
    return uri[len("s3://") :].rstrip("/"), s3_filesystem(portable=True)  # with storage_filesystem, no scheme


class CheckpointStorageError(OSError):
    """The checkpoint storage cannot take this stage's checkpoints; raised before any training."""


def checkpoint_bytes(config: StageConfig) -> int | None:
    """About how many bytes one checkpoint of this stage takes: the consolidated model, DeepSpeed's model states
    (fp32) and Adam's fp32 master weights and two moments for the trainable part. None when the model's config
    cannot be read here (the workers then report why)."""
    import torch

    from convllava.modeling.config import ConvLlavaConfig
    from convllava.modeling.model import ConvLlavaForCausalLM
    from convllava.modeling.trainable import set_trainable

    try:
        if not config.init_from:
            model_config = ConvLlavaConfig.from_preset(config.preset)
        elif is_s3(config.init_from):
            raw = read_bytes(config.init_from.rstrip("/") + "/config.json")
            model_config = ConvLlavaConfig.from_dict(json.loads(raw))
        else:
            model_config = ConvLlavaConfig.from_pretrained(config.init_from)
    except Exception as e:  # noqa: BLE001 - only an estimate; the workers load the model and report failures
        log.warning("no checkpoint size estimate: reading the model config of %s failed: %s", config.init_from, e)
        return None
    with torch.device("meta"):  # shapes only: a 7B model allocates nothing
        model = ConvLlavaForCausalLM(model_config)
    set_trainable(model, config.trainable)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(1.1 * (8 * total + 12 * trainable))


def check_storage(storage: str, storage_path: str, filesystem, config: StageConfig, run_name: str) -> None:
    """Before any work: the storage takes a write (and a delete), and a local one has room for `keep_last` + 1
    checkpoints (Ray Train writes the next one before it deletes the oldest), less those a resumed run already has.

    Raises:
        CheckpointStorageError: naming the storage and what is wrong.
    """
    import uuid

    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    probe = f"{storage_path}/.convllava-write-probe-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise CheckpointStorageError(
            f"checkpoint storage {storage} is not writable ({type(e).__name__}: {e}); nothing was trained"
        ) from e
    if filesystem is not None:
        return  # object storage has no capacity to check
    need = checkpoint_bytes(config)
    if need is None:
        return
    keep = config.keep_last or 1
    existing = min(keep, len(list(Path(storage_path, run_name).glob("checkpoint_*"))))
    count = keep + 1 - existing
    free = shutil.disk_usage(storage_path).free
    if free < need * count:
        raise CheckpointStorageError(
            f"checkpoint storage {storage} has {free / 2**20:.1f} MiB free but {config.name} needs about "
            f"{need * count / 2**20:.1f} MiB for {count} more checkpoints of {need / 2**20:.1f} MiB "
            f"(keep_last={config.keep_last}, plus the one being written, less {existing} already there); "
            "free space or choose another --storage; nothing was trained"
        )


def final_checkpoint(config: StageConfig, result) -> tuple[str, dict[str, Any]]:
    """(path, trainer state) of the checkpoint a finished stage hands on: Ray Train's latest registered one, unless
    a newer one of the same run config is complete in the run's storage. That happens when a driver dies in the
    second between the last upload and the controller's registration: the rerun resumes at the last step
    (`resume_point`), trains nothing, reports nothing, and Ray Train still names the older checkpoint.

    Never records an incomplete checkpoint, and never downloads one (100+ GB at the paper's scale): the ranks'
    markers and the trainer state are checked against the storage listing.

    Raises:
        RuntimeError: the stage has no complete checkpoint at all.
    """
    from jobs.train.checkpoints import newest_complete, verify_stored_checkpoint

    registered = None
    if result.checkpoint is not None:
        path = result.checkpoint.path
        registered = path, verify_stored_checkpoint(result.checkpoint.filesystem, path)
        if registered[1]["step"] == registered[1]["total_steps"]:
            return registered
    newest = newest_complete(result.filesystem, result.path)
    if newest is not None and newest[1]["config_hash"] == config.config_hash():
        if registered is None or newest[1]["step"] > registered[1]["step"]:
            return newest
    if registered is None:
        raise RuntimeError(f"stage {config.name} finished without a checkpoint")
    return registered


def run_stage(
    config: StageConfig,
    storage: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    address: str | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    plan: MemoryPlan | None = None,
) -> StageResult:
    """Train one stage; returns where its verified checkpoint and consolidated model live.

    Args:
        config: the resolved stage config.
        storage: where Ray Train keeps checkpoints (local folder or `s3://`); a run with the same `run_name`
            under the same storage resumes from its latest checkpoint.
        tracking_uri / run_id: MLflow store and the run rank 0 logs into (created when only the URI is given).
        on_step: called on this process with (step, total_steps, metrics) for each step rank 0 logs.
        plan: the stage's memory plan when the caller made it (a pipeline's preflight): logged into the run and
            checked, not made again. None: planned here.
    """
    called = time.time()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from jobs.private_apis import StageTrainer
    from jobs.tracking.runs import best_effort, log_metric_rows, start_run
    from jobs.train.checkpoints import TRAINER_STATE

    config.check_runnable()
    # Workers run in another directory: local paths must be absolute before they travel.
    local = {
        k: str(Path(v).resolve())
        for k, v in (("data", config.data), ("init_from", config.init_from))
        if v and not is_s3(v) and not Path(v).is_absolute()
    }
    if local:
        config = config.replace(**local)
    try:
        storage_path, filesystem = storage_for(storage)
    except OSError as e:
        raise CheckpointStorageError(
            f"checkpoint storage {storage} cannot be created ({type(e).__name__}: {e}); nothing was trained"
        ) from e
    check_storage(storage, storage_path, filesystem, config, run_name or config.name)
    ensure_ray(address)
    owns_run = bool(tracking_uri and run_id is None)
    if owns_run:
        run_id = start_run(
            tracking_uri,
            DEFAULT_EXPERIMENT,
            run_name or config.name,
            tags={TAG_STAGE: str(config.stage), TAG_CONFIG_HASH: config.config_hash()},
        )
    from jobs.tracking.runs import client

    if tracking_uri and run_id:
        log_stage_config(config, tracking_uri, run_id)
        log_stage_data(config, tracking_uri, run_id)
    # The memory plan before any worker starts: a stage that cannot fit its GPUs is refused here, with the advice.
    from jobs.train.preflight import preflight

    try:
        preflight(config, tracking_uri, run_id, plan=plan)
    except BaseException:
        if owns_run:
            best_effort(f"mark run {run_id} FAILED", lambda: client(tracking_uri).set_terminated(run_id, "FAILED"))
        raise

    if len(alive_nodes()) == 1:
        # Ray Train's preemption watcher (one more actor process per stage) reacts to a node being drained; on a
        # one-node instance there is no other node to go on with.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    strategy = DeepSpeedStrategy(config, config.max_workers)  # its Ray scaling; each worker builds its own
    secrets = share_secrets()
    feed = StepFeed(on_step) if on_step is not None else None
    run = {"tracking_uri": tracking_uri, "run_id": run_id}
    trainer = StageTrainer(
        train_loop_per_worker,
        train_loop_config={
            "stage": config.to_dict(),
            "run": run,
            "secrets": secrets,
            "steps": feed.handle if feed else None,
            "startup": [("called", called), ("driver", time.time())],
        },
        scaling_config=strategy.scaling_config(),
        run_config=RunConfig(
            name=run_name or config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            # Ray Train's INFO lines (worker group start, "Reporting training result ...") go to its log files
            logging_config=LoggingConfig(log_level="WARNING"),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_last),
            worker_runtime_env=worker_runtime_env(WORKER_MLFLOW_HTTP),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        if owns_run:  # never let a tracking outage hide the training error
            best_effort(f"mark run {run_id} FAILED", lambda: client(tracking_uri).set_terminated(run_id, "FAILED"))
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        # Ray's errors name neither the stage nor the storage: say both, and what a rerun does.
        raise RuntimeError(
            f"stage {config.name} failed (run storage {storage.rstrip('/')}/{run_name or config.name}: it records "
            f"only checkpoints every worker finished uploading; a rerun with the same run name resumes from the "
            f"latest): {e}"
        ) from e
    finally:
        if feed is not None:
            feed.close()
    if owns_run:
        status = "FAILED" if result.error else "FINISHED"
        best_effort(f"mark run {run_id} {status}", lambda: client(tracking_uri).set_terminated(run_id, status))
    if result.error:
        raise RuntimeError(f"stage {config.name} failed: {result.error}") from result.error
    path, state = final_checkpoint(config, result)
    checkpoint_uri = f"s3://{path}" if filesystem is not None else path
    if state["step"] != state["total_steps"]:
        raise RuntimeError(f"stage {config.name}: last checkpoint is at step {state['step']} of {state['total_steps']}")
    # Metrics rank 0 could not send before it finished (server down at the end): the driver tries once more.
    rows = state.get("unlogged_metrics", []) if tracking_uri and run_id else []
    unlogged_steps = log_metric_rows(tracking_uri, run_id, rows) if rows else []
    if unlogged_steps:
        log.warning(
            "stage %s: MLflow run %s is missing the metrics of steps %s (tracking server %s unreachable); "
            "the values are in the final checkpoint's %s",
            config.name,
            run_id,
            unlogged_steps,
            tracking_uri,
            TRAINER_STATE,
        )
    return StageResult(
        config.name, checkpoint_uri, f"{checkpoint_uri}/model", state["step"], state["metrics"], run_id, unlogged_steps
    )

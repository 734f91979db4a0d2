"""`convllava train`: run one stage as a Ray Train `TorchTrainer` job with DeepSpeed on every worker.

The driver resolves the config, creates (or reuses) the MLflow run and logs the resolved config, starts the
trainer with a `FailureConfig` (a killed worker restarts the group from the latest checkpoint) and returns the
verified, consolidated checkpoint's URI — the only thing the next stage needs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convllava.storage import is_s3
from jobs.stage_config import StageConfig
from jobs.strategy import DeepSpeedStrategy

log = logging.getLogger(__name__)

WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
              "CONVLLAVA_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")  # fmt: skip
# Credentials reach the workers through the object store, never through the runtime env: Ray writes every runtime
# env it creates, env_vars included, into runtime_env_agent.log on each node and keeps it in its Train run state.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # fmt: skip
# Rank 0 logs from a background thread, but its setup calls and its final flush wait on MLflow: by default one
# request to a down server retries for about four minutes. Workers get short requests unless the user set them.
WORKER_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass
class StageResult:
    name: str
    checkpoint_uri: str  # the whole checkpoint (DeepSpeed state + model), for resuming
    model_uri: str  # the consolidated Hugging Face-format model: what the next stage initialises from
    steps: int
    metrics: dict[str, float]
    run_id: str | None
    unlogged_steps: list[int] = field(default_factory=list)  # steps whose metrics MLflow never stored


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train

    os.environ.update(ray.get(loop_config["secrets"]))  # before anything reads credentials (see SECRET_ENV)
    from jobs.recipe import StageRecipe

    ctx = ray.train.get_context()
    config = StageConfig.from_dict(loop_config["stage"])
    recipe = StageRecipe(config, loop_config["run"], ctx.get_world_rank(), ctx.get_world_size())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        recipe.setup(None)
        recipe.train()
        return
    with checkpoint.as_directory() as directory:
        recipe.setup(Path(directory))
    recipe.train()


def storage_for(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: a local folder, or an `s3://` prefix through pyarrow."""
    if not is_s3(uri):
        path = Path(uri).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # Ray Train pickles this filesystem into its controller and workers. The train loop gets SECRET_ENV, the controller
    # nothing: keys that live only in this process's environment must travel inside the filesystem, or the
    # controller's checkpoint records go out unsigned. (Without keys here, each process uses the default AWS chain.)
    # pyarrow's pickle keeps endpoint, region and keys but drops `retry_strategy`, so every process retries with
    # pyarrow's default: the AWS standard strategy, 3 attempts per request with backoff.
    keys = {}
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        keys = {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                "session_token": os.environ.get("AWS_SESSION_TOKEN")}  # fmt: skip
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"), **keys)
    return uri[len("s3://") :].rstrip("/"), fs  # with storage_filesystem set, the path has no scheme


def run_stage(
    config: StageConfig,
    storage: str,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    run_name: str | None = None,
    address: str | None = None,
) -> StageResult:
    """Train one stage; returns where its verified checkpoint and consolidated model live.

    Args:
        config: the resolved stage config.
        storage: where Ray Train keeps checkpoints (local folder or `s3://`); a run with the same `run_name`
            under the same storage resumes from its latest checkpoint.
        tracking_uri / run_id: MLflow store and the run rank 0 logs into (created when only the URI is given).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from jobs.recipe import TRAINER_STATE, verify_checkpoint
    from jobs.tracking import log_metric_rows, log_params, retry_call, start_run
    from pipelines.ray_runtime import ensure_ray

    config.check_runnable()
    # Workers run in another directory: local paths must be absolute before they travel.
    local = {k: str(Path(v).resolve()) for k, v in (("data", config.data), ("init_from", config.init_from))
             if v and not is_s3(v) and not Path(v).is_absolute()}  # fmt: skip
    if local:
        config = config.replace(**local)
    ensure_ray(address)
    owns_run = bool(tracking_uri and run_id is None)
    if owns_run:
        run_id = start_run(tracking_uri, "convllava", run_name or config.name,
                           tags={"convllava.stage": str(config.stage), "convllava.config_hash": config.config_hash()})  # fmt: skip
        log_params(tracking_uri, run_id, config.to_dict())
    from jobs.tracking import client

    if tracking_uri and run_id:
        client(tracking_uri).log_text(run_id, config.to_yaml(), "stage_config.yaml")

    storage_path, filesystem = storage_for(storage)
    strategy = DeepSpeedStrategy(config, config.workers)
    env = {**WORKER_MLFLOW_HTTP, **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}}
    secrets = ray.put({k: os.environ[k] for k in SECRET_ENV if k in os.environ})
    run = {"tracking_uri": tracking_uri, "run_id": run_id}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": config.to_dict(), "run": run, "secrets": secrets},
        scaling_config=strategy.scaling_config(),
        run_config=RunConfig(
            name=run_name or config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_last),
            worker_runtime_env={"env_vars": env},
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        if owns_run:  # never let a tracking outage hide the training error
            retry_call(f"mark run {run_id} FAILED", lambda: client(tracking_uri).set_terminated(run_id, "FAILED"))
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        # Ray's errors name neither the stage nor the storage: say both, and what a rerun does.
        raise RuntimeError(
            f"stage {config.name} failed (run storage {storage.rstrip('/')}/{run_name or config.name}: it records "
            f"only checkpoints every worker finished uploading; a rerun with the same run name resumes from the "
            f"latest): {e}"
        ) from e
    if owns_run:
        status = "FAILED" if result.error else "FINISHED"
        retry_call(f"mark run {run_id} {status}", lambda: client(tracking_uri).set_terminated(run_id, status))
    if result.error:
        raise RuntimeError(f"stage {config.name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"stage {config.name} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = verify_checkpoint(Path(directory), config.workers)  # never record an incomplete checkpoint
    checkpoint_uri = f"s3://{result.checkpoint.path}" if filesystem is not None else result.checkpoint.path
    if state["step"] != state["total_steps"]:
        raise RuntimeError(f"stage {config.name}: last checkpoint is at step {state['step']} of {state['total_steps']}")
    # Metrics rank 0 could not send before it finished (server down at the end): the driver tries once more.
    rows = state.get("unlogged_metrics", []) if tracking_uri and run_id else []
    unlogged_steps = log_metric_rows(tracking_uri, run_id, rows) if rows else []
    if unlogged_steps:
        log.warning("stage %s: MLflow run %s is missing the metrics of steps %s (tracking server %s unreachable); "
                    "the values are in the final checkpoint's %s", config.name, run_id, unlogged_steps, tracking_uri,
                    TRAINER_STATE)  # fmt: skip
    return StageResult(config.name, checkpoint_uri, f"{checkpoint_uri}/model", state["step"], state["metrics"], run_id,
                       unlogged_steps)  # fmt: skip

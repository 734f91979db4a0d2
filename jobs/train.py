"""`convllava train`: run one stage as a Ray Train `TorchTrainer` job with DeepSpeed on every worker.

The driver resolves the config, creates (or reuses) the MLflow run and logs the resolved config, starts the
trainer with a `FailureConfig` (a killed worker restarts the group from the latest checkpoint) and returns the
verified, consolidated checkpoint's URI — the only thing the next stage needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convllava.storage import is_s3
from jobs.stage_config import StageConfig
from jobs.strategy import DeepSpeedStrategy

WORKER_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "CONVLLAVA_CACHE",
              "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")  # fmt: skip


@dataclass
class StageResult:
    name: str
    checkpoint_uri: str  # the whole checkpoint (DeepSpeed state + model), for resuming
    model_uri: str  # the consolidated Hugging Face-format model: what the next stage initialises from
    steps: int
    metrics: dict[str, float]
    run_id: str | None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

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
    fs = pafs.S3FileSystem(endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from jobs.tracking import log_params, start_run
    from pipelines.ray_runtime import ensure_ray

    config.check_runnable()
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
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": config.to_dict(), "run": {"tracking_uri": tracking_uri, "run_id": run_id}},
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
    except BaseException:
        if owns_run:
            client(tracking_uri).set_terminated(run_id, "FAILED")
        raise
    if owns_run:
        client(tracking_uri).set_terminated(run_id, "FAILED" if result.error else "FINISHED")
    if result.error:
        raise RuntimeError(f"stage {config.name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"stage {config.name} finished without a checkpoint")
    from jobs.recipe import verify_checkpoint

    with result.checkpoint.as_directory() as directory:
        state = verify_checkpoint(Path(directory), config.workers)  # never record an incomplete checkpoint
    checkpoint_uri = f"s3://{result.checkpoint.path}" if filesystem is not None else result.checkpoint.path
    if state["step"] != state["total_steps"]:
        raise RuntimeError(f"stage {config.name}: last checkpoint is at step {state['step']} of {state['total_steps']}")
    return StageResult(config.name, checkpoint_uri, f"{checkpoint_uri}/model", state["step"], state["metrics"], run_id)

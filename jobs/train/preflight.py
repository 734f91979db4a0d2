"""The memory plan `convllava train` and `pipeline run` make before launching a stage: logged to the stage's MLflow
run, printed, and refused (`MemoryPlanError`) when the stage does not fit its GPUs."""

from __future__ import annotations

import os
import time

from jobs.tracking.vocabulary import ARTIFACT_PLAN
from jobs.train.config import StageConfig
from jobs.train.plan import MemoryPlan, plan_stage


class MemoryPlanError(RuntimeError):
    """A stage whose plan does not fit its GPUs; the message is the plan's advice."""


def log_plan(plan: MemoryPlan, tracking_uri: str, run_id: str, prefix: str = "") -> None:
    """The plan into an MLflow run: `plan/...` params and metrics, and `plan.txt` (each under `prefix`). A
    prefixed plan (the pipeline's, made again on a resumed run once shards exist) logs no params, which MLflow
    does not let change; for the same reason a stage run that a resumed pipeline reopens keeps the `plan/...`
    params its first attempt logged (that plan may have assumed the shards' geometry), and gets this plan's
    metrics and `plan.txt`."""
    from jobs.tracking.runs import client, log_metric_rows, log_params

    c = client(tracking_uri)
    if not prefix:
        logged = c.get_run(run_id).data.params
        log_params(tracking_uri, run_id, {k: v for k, v in plan.params().items() if k not in logged})
    now = int(time.time() * 1000)
    log_metric_rows(tracking_uri, run_id, [[prefix + k, v, now, 0] for k, v in plan.metrics().items()])
    c.log_text(run_id, plan.format() + "\n", prefix + ARTIFACT_PLAN)


def preflight(
    config: StageConfig,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    assumed: tuple[int, tuple[int, int]] | None = None,
    prefix: str = "",
    plan: MemoryPlan | None = None,
) -> MemoryPlan:
    """The plan `convllava train` and `pipeline run` make before launching a stage: logged, printed, and raised
    as `MemoryPlanError` when it does not fit. The GPU memory is the visible GPU's, else `CONVLLAVA_GPU_MEMORY_GIB`,
    else 80 GiB assumed (a head node plans for workers it cannot see). `plan`: one made already (a pipeline's
    preflight, handed to its stage): logged and checked here, not made again."""
    if plan is None:
        env = os.environ.get("CONVLLAVA_GPU_MEMORY_GIB")
        plan = plan_stage(config, gpu_memory_gib=float(env) if env else None, assumed=assumed)
    if tracking_uri and run_id:
        log_plan(plan, tracking_uri, run_id, prefix)
    last = plan.format().splitlines()[-1]
    print(f"[{config.name}] {last}", flush=True)
    if not plan.fits:
        raise MemoryPlanError(f"stage {config.name} does not fit its GPUs:\n{plan.format()}")
    return plan

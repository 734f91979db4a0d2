"""Stage training: the Ray Train job against the same recipe in one process, for all three tiny stages.

For each shipped tiny stage config (`jobs/configs/tiny/stage{1,2,3}.yaml`: ZeRO-2, ZeRO-3, ZeRO-3, their trainable
sets, global batch 16, micro-batch 4), with `max_steps=--steps`, one checkpoint at the end and no retries:

- job: `jobs.train.run_stage`, Ray Train with 2 CPU workers (one thread each), DeepSpeed over gloo, rank 0 logging
  every step to MLflow (SQLite; the store exists before the call, as in a pipeline). Steady state from the logged
  `train/step_time_s`; start-up from the logged timestamps (call → step 1 done, last step done → return) and its
  breakdown from the `startup/*` metrics rank 0 logs (`jobs.train.recipe.startup_metrics`).
- baseline: `jobs.train.local.run_local`, the same `StageRecipe` in this process (2 torch threads, no Ray, no MLflow, a
  gloo group of one): the same global batches (grad_accum 4 instead of 2 per worker), the same ZeRO stage.
  For the ZeRO-3 stages a second baseline runs them with ZeRO-2: what ZeRO-3's partitioning costs by itself.

Steady state: steps warmup+1 .. steps-1 (the last step checkpoints). Runs are interleaved (baseline, job per
stage) `--repeats` times; the best of each is compared. Per-step losses of job and baseline must agree (same init,
same data, float summation order aside). Before each run the script waits for an idle machine; the 1-minute load
average around every run is recorded. Also: text padding per micro-batch with and without length grouping.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py [--steps 40] [--repeats 1] [--out bench/results/train_step.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import wait_quiet  # noqa: E402

from convllava.data.shards import MANIFEST  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "train_step.json"
DATA_ROOT = REPO / "work" / "bench-train"
DATA_PARAMS = {"version": 1, "seed": 0, "n_caption": 800, "n_instruct": 400, "n_eval": 2, "resolution": 256}
STAGES = {"stage1": "captions", "stage2": "captions", "stage3": "mix"}  # which shards each stage trains on
BASELINE_THREADS = 2
GOAL_RATIO = 0.85
PAD_EPOCHS = 5


def ensure_data() -> tuple[dict[str, Path], float | None]:
    """Shards by name (`captions`: the captions source; `mix`: captions + instruct) and the seconds spent building
    them (None: reused)."""
    shards = {"captions": DATA_ROOT / "shards-stage1", "mix": DATA_ROOT / "shards-mix"}
    stamp = DATA_ROOT / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == DATA_PARAMS:
        if all((p / MANIFEST).is_file() for p in shards.values()):
            return shards, None
    import ray

    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo.data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    t = time.perf_counter()
    shutil.rmtree(DATA_ROOT, ignore_errors=True)
    p = DATA_PARAMS
    generate_demo_data(
        DATA_ROOT / "data", seed=p["seed"], n_caption=p["n_caption"], n_instruct=p["n_instruct"], n_eval=p["n_eval"]
    )
    mixture = Mixture.from_yaml(DATA_ROOT / "data" / "mixture.yaml")
    captions = Mixture(sources=tuple(s for s in mixture.sources if s.name == "captions"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = PreprocessConfig(resolution=p["resolution"])
        run_preprocess(captions, config, str(shards["captions"]), echo=lambda *_: None)
        run_preprocess(mixture, config, str(shards["mix"]), echo=lambda *_: None)
    finally:
        ray.shutdown()
    stamp.write_text(json.dumps(DATA_PARAMS))
    return shards, time.perf_counter() - t


def stage_config(stage: str, shards: Path, steps: int, **overrides):
    from jobs.train.config import StageConfig

    c = StageConfig.from_yaml(REPO / "jobs" / "configs" / "tiny" / f"{stage}.yaml")
    return c.replace(
        data=str(shards.resolve()),
        max_steps=steps,
        checkpoint_every=0,
        max_failures=0,
        preset=c.preset or "tiny",
        tokenizer=c.tokenizer or "tiny",
        **overrides,
    )


def steady(rows: list[dict[str, float]], warmup: int, steps: int, batch: int) -> dict[str, float]:
    times = [r["train/step_time_s"] for r in rows[warmup : steps - 1]]
    return {
        "steps": len(times),
        "samples_per_s": batch * len(times) / sum(times),
        "median_step_s": statistics.median(times),
    }


def _measured(fn) -> tuple[Any, dict[str, Any]]:
    quiet = wait_quiet(max_wait=ARGS.wait_quiet, threshold=0.3)
    before = os.getloadavg()[0]
    started, t = time.time(), time.perf_counter()
    out = fn()
    return out, {
        "started": started,
        "wall_s": time.perf_counter() - t,
        "load1_before": before,
        "load1_after": os.getloadavg()[0],
        "quiet_before": quiet,
    }


def job(config, steps: int, warmup: int) -> dict[str, Any]:
    """`run_stage` end to end (Ray started first, shut down after); steps from what rank 0 logged to MLflow."""
    import ray

    from jobs.tracking.runs import client, default_tracking_uri
    from jobs.train.driver import run_stage

    work = Path(tempfile.mkdtemp(prefix="bench-train-job-"))
    try:
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t
        uri = default_tracking_uri(work)
        # the store exists before the call, as in a pipeline (created once per workdir)
        client(uri).search_experiments()
        (result, run) = _measured(lambda: run_stage(config, str(work / "runs"), tracking_uri=uri, run_name="bench"))
        t_end = time.time()
        c = client(uri)
        history = {
            k: sorted(c.get_metric_history(result.run_id, k), key=lambda m: m.step)
            for k in ("train/step_time_s", "train/loss")
        }
        startup = {
            k.removeprefix("startup/").removesuffix("_s"): v
            for k, v in c.get_run(result.run_id).data.metrics.items()
            if k.startswith("startup/")
        }
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    times = history["train/step_time_s"]
    if [m.step for m in times] != list(range(1, steps + 1)):
        raise RuntimeError(f"job logged steps {[m.step for m in times]}, expected 1..{steps}")
    rows = [
        {"train/step_time_s": m.value, "train/loss": loss.value}
        for m, loss in zip(times, history["train/loss"], strict=True)
    ]
    stamps = [m.timestamp / 1000 for m in times]
    return {
        **run,
        "ray_init_s": ray_init_s,
        "call_to_step1_done_s": stamps[0] - run["started"],
        "last_step_to_return_s": t_end - stamps[-1],
        "startup_s": startup,
        "steady": steady(rows, warmup, steps, config.global_batch_size),
        "loss": [r["train/loss"] for r in rows],
    }


def local(config, steps: int, warmup: int) -> dict[str, Any]:
    """`run_local` in this process; steps from its metrics.jsonl (each row stamped when it was written)."""
    import torch

    from jobs.train.local import METRICS_FILE, run_local

    torch.set_num_threads(BASELINE_THREADS)
    work = Path(tempfile.mkdtemp(prefix="bench-train-local-"))
    try:
        _, run = _measured(lambda: run_local(config, work, run_name="bench"))
        t_end = time.time()
        rows = [json.loads(line) for line in (work / "bench" / METRICS_FILE).read_text().splitlines()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if [r["step"] for r in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"local run logged steps {[r['step'] for r in rows]}, expected 1..{steps}")
    return {
        **run,
        "threads": BASELINE_THREADS,
        "call_to_step1_done_s": rows[0]["time"] - run["started"],
        "last_step_to_return_s": t_end - rows[-1]["time"],
        "steady": steady(rows, warmup, steps, config.global_batch_size),
        "loss": [r["train/loss"] for r in rows],
    }


def padding(shards: Path) -> dict[str, Any]:
    """Text padding per micro-batch (padded / all positions, right-padded to the longest), grouped by length or not."""
    from convllava.data.epochs import plan_epoch
    from convllava.data.shards import ShardSet

    s = ShardSet(str(shards))
    lengths = np.asarray([i.length for i in s.infos], dtype=np.int64)
    out: dict[str, Any] = {"samples": len(s)}
    for grouped in (True, False):
        fractions = []
        for epoch in range(PAD_EPOCHS):
            plan = plan_epoch(
                s.infos, micro_batch_size=4, grad_accum=2, world_size=2, seed=0, epoch=epoch, group_by_length=grouped
            )
            fractions.append(plan.padding_fractions(s.infos).ravel())
        pooled = np.concatenate(fractions)
        out["grouped" if grouped else "random"] = {
            "micro_batches": int(pooled.size),
            "mean": float(pooled.mean()),
            "p90": float(np.percentile(pooled, 90)),
        }
    out["length_mean"] = float(lengths.mean())
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        f"| stage (ZeRO), {result['steady_steps']} | baseline: recipe, 1 process, {BASELINE_THREADS} threads, "
        "samples/s | job: run_stage, 2 workers, samples/s | job / baseline | loss max abs diff |",
        "|---|---|---|---|---|",
    ]
    for stage, s in result["stages"].items():
        lines.append(
            f"| {stage} (ZeRO-{s['zero']}) | {s['baseline_best']:.1f} | {s['job_best']:.1f} | "
            f"**{s['ratio']:.2f}x** | {s['loss_max_abs_diff']:.1e} |"
        )
        if "baseline_zero2_best" in s:
            lines.append(
                f"| {stage}, baseline with ZeRO-2 | {s['baseline_zero2_best']:.1f} | | "
                f"{s['job_best'] / s['baseline_zero2_best']:.2f}x | |"
            )
    lines += [
        "",
        "| start and end, s (best run) | ray.init | call → step 1 done | last step → return | wall |",
        "|---|---|---|---|---|",
    ]
    for stage, s in result["stages"].items():
        for kind in ("baseline", "job"):
            r = min(s[kind], key=lambda x: x["wall_s"])
            ray_init = f"{r['ray_init_s']:.1f}" if "ray_init_s" in r else ""
            lines.append(
                f"| {stage} {kind} | {ray_init} | {r['call_to_step1_done_s']:.1f} | "
                f"{r['last_step_to_return_s']:.1f} | {r['wall_s']:.1f} |"
            )
    phases = ("driver", "worker_start", "worker_init", "model", "engine", "first_step", "total")
    lines += [
        "",
        "| job start-up, s (best run): " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    for stage, s in result["stages"].items():
        r = min(s["job"], key=lambda x: x["wall_s"])["startup_s"]
        lines.append(f"| {stage} | " + " | ".join(f"{r.get(p, float('nan')):.1f}" for p in phases) + " |")
    lines += [
        "",
        "| text padding per micro-batch, epochs 0–4 | grouped by length: mean / p90 | random: mean / p90 |",
        "|---|---|---|",
    ]
    for name, pad in result["padding"].items():
        g, r = pad["grouped"], pad["random"]
        lines.append(
            f"| {name} ({g['micro_batches']} micro-batches) | {g['mean']:.3f} / {g['p90']:.3f} | "
            f"{r['mean']:.3f} / {r['p90']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steady state (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (default: %(default)s)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=10.0,
        metavar="S",
        help="before each run wait up to S s for an idle machine (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    ARGS = parser.parse_args(argv)
    if ARGS.warmup < 1 or ARGS.steps < ARGS.warmup + 3:
        parser.error("--steps must leave at least 2 steady steps after --warmup (the last step is left out)")
    steps, warmup = ARGS.steps, ARGS.warmup
    load_start = os.getloadavg()
    shards, built_s = ensure_data()
    result: dict[str, Any] = {
        "description": __doc__.splitlines()[0],
        "steps": steps,
        "warmup": warmup,
        "steady_steps": f"steps {warmup + 1}–{steps - 1}",
        "data": {**DATA_PARAMS, "built_s": built_s},
        "stages": {},
    }
    for stage in ARGS.stages:
        config = stage_config(stage, shards[STAGES[stage]], steps)
        zero = int(config.deepspeed.removeprefix("zero").split("_")[0])
        runs: dict[str, list] = {"baseline": [], "job": []}
        if zero == 3:
            runs["baseline_zero2"] = []
        for _ in range(ARGS.repeats):
            runs["baseline"].append(local(config, steps, warmup))
            if zero == 3:
                runs["baseline_zero2"].append(local(config.replace(deepspeed="zero2"), steps, warmup))
            runs["job"].append(job(config, steps, warmup))
        best = {k: max(r["steady"]["samples_per_s"] for r in v) for k, v in runs.items()}
        diff = max(abs(a - b) for a, b in zip(runs["job"][0]["loss"], runs["baseline"][0]["loss"], strict=True))
        result["stages"][stage] = {
            "zero": zero,
            "config": config.to_dict(),
            **runs,
            "loss_max_abs_diff": diff,
            **{f"{k}_best": v for k, v in best.items()},
            "ratio": best["job"] / best["baseline"],
        }
        print(f"{stage}: job {best['job']:.1f} vs baseline {best['baseline']:.1f} samples/s", flush=True)
    result["padding"] = {name: padding(path) for name, path in shards.items()}
    result["goal"] = {"ratio": GOAL_RATIO, "met": {s: v["ratio"] >= GOAL_RATIO for s, v in result["stages"].items()}}
    result["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    ARGS.out.parent.mkdir(parents=True, exist_ok=True)
    ARGS.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


ARGS: argparse.Namespace


if __name__ == "__main__":
    raise SystemExit(main())

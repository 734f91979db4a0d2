"""Stage-training throughput (the real Ray Train + DeepSpeed job vs a bare PyTorch loop) and text padding per batch.

Data (built once into `work/bench-train/`, reused while its parameters match): the demo data set
(`pipelines.demo_data.generate_demo_data(seed=0, n_caption=800, n_instruct=400)`) preprocessed with
`pipelines.preprocess.run_preprocess(..., PreprocessConfig(resolution=256))` twice:
- `shards-stage1`: its `captions` source only — stage 1's data (caption pairs, as the paper's stage 1). The full
  mixture cannot be used for stage 1: its ~2% text-only instruct samples form text-only micro-batches, which have no
  gradient path to stage 1's trainable groups (`vision.stage5`, `projector`); DeepSpeed then refuses the loss
  ("loss must be a scalar tensor") and the job fails (see the report).
- `shards-mix`: the whole mixture (captions + instruct), for the padding numbers of stages 2–3.

1. Throughput, samples/s, tiny stage-1 config `jobs/configs/tiny/stage1.yaml` as shipped (preset tiny, trainable
   `[vision.stage5, projector]`, global batch 16, micro-batch 4, 2 workers → grad_accum 2, AdamW lr 2e-3 with
   warmup + cosine, clipping 1.0, ZeRO-2, fp32, sdpa) with only these overrides: `data` (the stage-1 shards),
   `max_steps` (`--steps`), `checkpoint_every=0` (one checkpoint, at the end) and `max_failures=0` (a failure is
   reported instead of retried).

   - job: `jobs.train.run_stage` — Ray Train `TorchTrainer`, 2 CPU workers (1 CPU each; Ray sets
     OMP_NUM_THREADS=1 in them), DeepSpeed ZeRO-2 over gloo, rank 0 logging every step to MLflow (SQLite) —
     into a fresh storage folder and tracking store. Ray is started first (`ray.init(num_cpus=2)`, timed and
     reported separately). Steady state comes from the per-step metrics the job logs (read back with
     `jobs.tracking.client(uri).get_metric_history`): `train/step_time_s` is the recipe's timed region (fetch rows,
     collate, forward, backward, `engine.step` for every micro-batch, the gloo all-reduce of the step's
     statistics); samples/s = samples / Σ step_time_s. The metric timestamps (ms) give a second, wall-clock figure
     per step that also counts what lies outside the timed region (rank 0's MLflow write, which rank 1 waits for
     at the next collective). The end-to-end wall time of `run_stage` (worker start-up, model build, DeepSpeed
     init, training, final checkpoint, verification) is reported separately.
   - bare loop: this process, `torch.set_num_threads(2)`, no Ray, no DeepSpeed: the same model (same preset and
     seed), the same trainable parameters, `torch.optim.AdamW` with the same lr, weight decay and `LambdaLR`
     schedule (`jobs.recipe.lr_lambda`), gradient clipping to 1.0, and the same batches: the job's own
     `plan_epoch(world_size=2, grad_accum=2)` plan, seen with world_size 1 — each step runs all 4 micro-batches of
     the global step (16 samples) with gradient accumulation (loss / 4) through the same `ShardSet.rows` +
     `collate` data path, then one optimizer step. Timed per step like the job (first micro-batch's fetch to
     after the optimizer step). Its per-step loss is compared with the job's (same init, same data: they must
     agree up to float summation order).

   - bare loop, 1 thread (reference, not the goal's baseline): the same loop with `torch.set_num_threads(1)`. On
     this 2-core machine, shared with other work, two intra-op threads collapse whenever another process holds a
     core (OpenMP threads wait on each other at every op: tens of times slower, not 2x), while one thread only
     slows in proportion; this run tells load from real differences.

   Both skip the first `--warmup` steps (default 5) and the last step (the step the job checkpoints after), so
   steady state covers steps warmup+1 .. steps-1, the same global batches on both sides. A bare run stops early
   once its steps have taken `--bare-budget` seconds (default 90; only under heavy outside load), and then
   measures steps warmup+1 .. its last (the table says so). Goal: job >= 0.85x bare (2 threads). The three are
   measured `--repeats` times (default 2), interleaved (bare 2 threads, bare 1 thread, job, ...); Ray is shut
   down after each job so no Ray process idles during a bare run. The 1-minute load average before/after each run
   and the busy CPU cores of the whole machine during it (from /proc/stat; `others` = not this process tree) are
   reported, because other work on a 2-core machine changes these numbers a lot; so are the cores our process
   tree (this process, or Ray and its workers) and everybody else used inside the steady window (sampled twice a
   second, interpolated to the window's ends), and samples per CPU-second of ours, which depends much less on how
   much of the machine others took (spin-waiting threads count as used). Before each run the script waits up to
   `--wait-quiet` seconds (default 10) for the machine to be idle.

   Then (unless `--no-profile`) one more job runs under instrumentation (not used for the headline numbers):
   inside each Ray worker the real `StageRecipe` runs with timers wrapped around `ShardSet.rows`, `collate`, the
   engine's forward/backward/step (accumulation vs boundary micro-steps; ZeRO-2 reduces gradients inside every
   backward, so a rank that waits for the other shows it there), the statistics all-reduce and rank 0's MLflow
   write, giving where the job's step time goes.

2. Text-padding fraction per micro-batch (padded positions / all positions when each micro-batch is right-padded
   to its longest sequence, `EpochPlan.padding_fractions(shards.infos)`), `plan_epoch(micro_batch_size=4,
   grad_accum=2, world_size=2, seed=0)` with `group_by_length=True` (the default: length-sorted megabatches of
   8 micro-batches) vs `False` (random micro-batches inside each resolution bucket); mean, p90 and the
   position-weighted fraction over every micro-batch of epoch 0 and of epochs 0–4 pooled, on both shard sets.

Run (about 5 minutes on an idle 2-core machine, up to about 10 under heavy outside load, plus about a minute
the first time to build the data):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/train_step.py [--steps 40] \
        [--out bench/results/train_step.json] [--repeats 2] [--no-profile] [--bare-budget 90]

It prints a markdown table and writes the numbers as JSON.
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
from _common import system_cpu, wait_quiet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "train_step.json"
DATA_ROOT = REPO / "work" / "bench-train"
DATA_PARAMS = {"version": 1, "seed": 0, "n_caption": 800, "n_instruct": 400, "n_eval": 2, "resolution": 256}
CONFIG_PATH = REPO / "jobs" / "configs" / "tiny" / "stage1.yaml"
BARE_THREADS = 2
REFERENCE_THREADS = 1  # also measured: one thread does not collapse when other processes load the cores
RAY_CPUS = 2
GOAL_RATIO = 0.85
CONTENDED_CORES = 0.3  # a run during whose steady steps other processes used more cores than this is contended
PAD_EPOCHS = 5


# ---------------------------------------------------------------------------------------------- machine load
def _own_cpu(split: bool = False):
    """CPU seconds of this process and its descendants (a local Ray instance and its workers are our children);
    with `split`, (all of them, the Ray Train worker processes alone)."""
    import psutil

    total = workers = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            if split and "RayTrainWorker" in " ".join(p.cmdline()):
                workers += t.user + t.system
        except psutil.Error:
            pass
    return (total, workers) if split else total


class CpuMeter:
    """Busy CPU cores over an interval: the whole machine, ours (this process tree) and everybody else's."""

    def __init__(self) -> None:
        self.load = os.getloadavg()[0]
        self.system, self.own, self.t0 = system_cpu(), _own_cpu(), time.perf_counter()

    def read(self) -> dict[str, float | None]:
        system, own, wall = system_cpu(), _own_cpu(), time.perf_counter() - self.t0
        cores = os.cpu_count() or 1
        ours = (own - self.own) / wall
        out: dict[str, float | None] = {"load1_before": self.load, "load1_after": os.getloadavg()[0]}
        if self.system is None or system is None or system[1] == self.system[1]:
            return {**out, "machine_cores": None, "our_cores": ours, "other_cores": None}
        machine = (system[0] - self.system[0]) / (system[1] - self.system[1]) * cores
        return {**out, "machine_cores": machine, "our_cores": ours, "other_cores": max(0.0, machine - ours)}


class CpuSampler:
    """Samples (time, our CPU seconds, machine busy/total jiffies) twice a second in a thread, so that the CPU our
    process tree used inside any later-known window (the steady steps) can be read back by interpolation."""

    def __init__(self, period: float = 0.5) -> None:
        import threading

        self.samples: list[tuple[float, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _sample(self) -> None:
        system = system_cpu() or (float("nan"), float("nan"))
        self.samples.append((time.time(), *_own_cpu(split=True), *system))

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(period)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def window(self, t0: float, t1: float, samples: int) -> dict[str, float]:
        """Busy cores (ours, everybody else's) between wall times t0 and t1, and `samples` per CPU-second of ours."""
        arr = np.asarray(self.samples, dtype=np.float64)
        names = ((1, "own"), (2, "workers"), (3, "busy"), (4, "total"))
        at = {name: np.interp([t0, t1], arr[:, 0], arr[:, i]) for i, name in names}
        wall = t1 - t0
        own_s = float(at["own"][1] - at["own"][0])
        workers_s = float(at["workers"][1] - at["workers"][0])
        machine = float((at["busy"][1] - at["busy"][0]) / max(1e-9, at["total"][1] - at["total"][0]))
        machine *= os.cpu_count() or 1
        return {"our_cores": own_s / wall, "other_cores": max(0.0, machine - own_s / wall),
                "ray_train_worker_cores": workers_s / wall,
                "samples_per_cpu_s": samples / own_s if own_s > 0 else float("nan"),
                "samples_per_ray_train_worker_cpu_s": samples / workers_s if workers_s > 0 else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def start_ray() -> float:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t


def ensure_data() -> tuple[Path, Path, float | None]:
    """(stage-1 shards, full-mixture shards, seconds spent building them or None when cached)."""
    train, mix, stamp = DATA_ROOT / "shards-stage1", DATA_ROOT / "shards-mix", DATA_ROOT / "params.json"
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == DATA_PARAMS
        and all((p / "manifest.json").is_file() for p in (train, mix))
    ):
        return train, mix, None
    import ray

    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo_data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    t = time.perf_counter()
    shutil.rmtree(DATA_ROOT, ignore_errors=True)
    p = DATA_PARAMS
    generate_demo_data(DATA_ROOT / "data", seed=p["seed"], n_caption=p["n_caption"], n_instruct=p["n_instruct"],
                       n_eval=p["n_eval"])  # fmt: skip
    mixture = Mixture.from_yaml(DATA_ROOT / "data" / "mixture.yaml")
    captions = Mixture(tuple(s for s in mixture.sources if s.name == "captions"))
    start_ray()
    try:
        config = PreprocessConfig(resolution=p["resolution"])
        run_preprocess(captions, config, str(train), echo=lambda *_: None)
        run_preprocess(mixture, config, str(mix), echo=lambda *_: None)
    finally:
        ray.shutdown()
    stamp.write_text(json.dumps(DATA_PARAMS))
    return train, mix, time.perf_counter() - t


def stage_config(shards: Path, steps: int):
    from jobs.stage_config import StageConfig

    return StageConfig.from_yaml(CONFIG_PATH).replace(data=str(shards.resolve()), max_steps=steps,
                                                      checkpoint_every=0, max_failures=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------- padding
def padding(shards: Path) -> dict[str, Any]:
    from convllava.data import plan_epoch
    from jobs.shards import ShardSet

    s = ShardSet(str(shards))
    lengths = np.asarray([i.length for i in s.infos], dtype=np.int64)
    out: dict[str, Any] = {"samples": len(s), "buckets": len({i.bucket for i in s.infos}),
                           "length_mean": float(lengths.mean()), "length_p10_p50_p90": [
                               float(q) for q in np.percentile(lengths, [10, 50, 90])]}  # fmt: skip
    for grouped in (True, False):
        per_epoch = []
        weighted = []
        for epoch in range(PAD_EPOCHS):
            plan = plan_epoch(s.infos, micro_batch_size=4, grad_accum=2, world_size=2, seed=0, epoch=epoch,
                              group_by_length=grouped)  # fmt: skip
            per_epoch.append(plan.padding_fractions(s.infos).ravel())
            longest = lengths[plan.batches].max(axis=-1) * plan.micro_batch_size
            weighted.append((float((longest - lengths[plan.batches].sum(axis=-1)).sum()), float(longest.sum())))
        pooled = np.concatenate(per_epoch)

        def stats(x: np.ndarray, w: list[tuple[float, float]]) -> dict[str, float]:
            return {"micro_batches": int(x.size), "mean": float(x.mean()), "p90": float(np.percentile(x, 90)),
                    "position_weighted": sum(a for a, _ in w) / sum(b for _, b in w)}  # fmt: skip

        out["grouped" if grouped else "random"] = {"epoch0": stats(per_epoch[0], weighted[:1]),
                                                   f"epochs0-{PAD_EPOCHS - 1}": stats(pooled, weighted)}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- measuring
def steady(values: list[float], warmup: int, steps: int) -> list[float]:
    """Values of steps warmup+1 .. steps-1 (1-based): no warm-up, not the step before the checkpoint."""
    return values[warmup : steps - 1]


def summarize(step_times: list[float], wall_times: list[float], batch: int) -> dict[str, float]:
    return {
        "steps": len(step_times),
        "samples_per_s": batch * len(step_times) / sum(step_times),
        "median_step_s": statistics.median(step_times),
        "min_step_s": min(step_times),
        "max_step_s": max(step_times),
        "wall_samples_per_s": batch * len(wall_times) / sum(wall_times),
    }


def bare_loop(shards: Path, steps: int, warmup: int, threads: int, budget_s: float) -> dict[str, Any]:
    """The same model, batches, optimizer and schedule in this process: no Ray, no DeepSpeed.

    Stops early (after at least two steady steps) once its steps have taken `budget_s`: with other processes on the
    cores, two threads can take seconds per step, and the run must still end.
    """
    import torch

    from convllava.config import ConvLlavaConfig
    from convllava.data import collate, plan_epoch
    from convllava.modeling import ConvLlavaForCausalLM
    from convllava.processor import ConvLlavaProcessor
    from convllava.trainable import set_trainable
    from jobs.recipe import lr_lambda
    from jobs.shards import ShardSet

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = stage_config(shards, steps)
        t_setup = time.perf_counter()
        torch.manual_seed(c.seed)
        kwargs = {"attn_implementation": c.attn_implementation} if c.attn_implementation else {}
        model_config = ConvLlavaConfig.from_preset(c.preset, **kwargs)
        model = ConvLlavaForCausalLM(model_config)
        pad_id = ConvLlavaProcessor.for_model(model_config, c.tokenizer).tokenizer.pad_token_id
        shard_set = ShardSet(c.data)
        set_trainable(model, c.trainable)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # The job's plan (world_size 2, grad_accum 2) seen with world_size 1: all micro-batches of a global step.
        plan = plan_epoch(shard_set.infos, micro_batch_size=c.micro_batch_size, grad_accum=c.grad_accum,
                          world_size=c.workers, seed=c.seed, epoch=0, group_by_length=c.group_by_length)  # fmt: skip
        if steps > plan.num_steps:
            raise SystemExit(f"--steps {steps} > {plan.num_steps} steps in one epoch of {shards}")
        optimizer = torch.optim.AdamW([{"params": params, "lr": c.lr}], lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, c.warmup_ratio, c.schedule))
        setup_s = time.perf_counter() - t_setup

        meter, sampler = CpuMeter(), CpuSampler().__enter__()
        records = []
        t_prev = t_loop = time.perf_counter()
        for step in range(steps):
            if len(records) >= warmup + 2 and time.perf_counter() - t_loop > budget_s:
                break
            micros = plan.batches[step].reshape(-1, c.micro_batch_size).tolist()  # (accum, rank) order
            start = time.perf_counter()
            data_s = compute_s = 0.0
            losses = []
            for micro in micros:
                t0 = time.perf_counter()
                batch = collate(shard_set.rows(micro), pad_id)
                t1 = time.perf_counter()
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"], pixel_values=batch["pixel_values"])  # fmt: skip
                (out.loss / len(micros)).backward()
                losses.append(out.loss.item())
                data_s += t1 - t0
                compute_s += time.perf_counter() - t1
            t2 = time.perf_counter()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            records.append({"step": step + 1, "step_time_s": end - start, "wall_s": end - t_prev, "data_s": data_s,
                            "fwd_bwd_s": compute_s, "optimizer_s": end - t2, "loss": sum(losses) / len(losses),
                            "grad_norm": float(grad_norm), "ended_at": time.time()})  # fmt: skip
            t_prev = end
        sampler.__exit__(None, None, None)
        cpu = meter.read()
    finally:
        torch.set_num_threads(previous_threads)
    kept = steady(records, warmup, steps)
    summary = summarize([r["step_time_s"] for r in kept], [r["wall_s"] for r in kept], c.global_batch_size)
    summary.update(
        sampler.window(records[warmup - 1]["ended_at"], kept[-1]["ended_at"], len(kept) * c.global_batch_size)
    )
    for key in ("data_s", "fwd_bwd_s", "optimizer_s"):
        summary[f"mean_{key}"] = statistics.mean(r[key] for r in kept)
    return {"threads": threads, "setup_s": setup_s, "steps_done": len(records), "stopped_early": len(records) < steps,
            "cpu": cpu, "steady": summary, "per_step": records}  # fmt: skip


def job(shards: Path, steps: int, warmup: int, profile_dir: Path | None = None) -> dict[str, Any]:
    """`jobs.train.run_stage` end to end; steady state from the metrics it logged to MLflow."""
    import ray

    import jobs.train
    from jobs.tracking import client, default_tracking_uri

    c = stage_config(shards, steps)
    work = Path(tempfile.mkdtemp(prefix="bench-train-job-"))
    original = jobs.train.train_loop_per_worker
    try:
        meter = CpuMeter()
        ray_init_s = start_ray()
        uri = default_tracking_uri(work)
        if profile_dir is not None:
            jobs.train.train_loop_per_worker = _profiled_loop(str(profile_dir))
        t, t_epoch = time.perf_counter(), time.time()
        with CpuSampler() as sampler:
            result = jobs.train.run_stage(c, str(work / "runs"), tracking_uri=uri, run_name="bench")
        run_stage_s = time.perf_counter() - t
        t_end = time.time()
        cpu = meter.read()
        history = {}
        for key in ("train/step_time_s", "train/loss", "train/samples_per_s", "train/grad_norm"):
            history[key] = sorted(client(uri).get_metric_history(result.run_id, key), key=lambda m: m.step)
    finally:
        jobs.train.train_loop_per_worker = original
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    times = history["train/step_time_s"]
    if [m.step for m in times] != list(range(1, steps + 1)):
        raise RuntimeError(f"job logged steps {[m.step for m in times]}, expected 1..{steps}")
    stamps = [m.timestamp / 1000 for m in times]
    phases = {  # from the metric timestamps (ms): when rank 0 logged step 1 and the last step
        "start_to_step1_logged_s": stamps[0] - t_epoch,
        "step1_to_last_step_logged_s": stamps[-1] - stamps[0],
        "last_step_logged_to_end_s": t_end - stamps[-1],
    }
    walls = [float("nan")] + [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    records = [{"step": m.step, "step_time_s": m.value, "wall_s": w, "loss": loss.value,
                "samples_per_s_metric": sps.value, "grad_norm": g.value}
               for m, w, loss, sps, g in zip(times, walls, history["train/loss"], history["train/samples_per_s"],
                                             history["train/grad_norm"], strict=True)]  # fmt: skip
    kept = steady(records, warmup, steps)
    summary = summarize([r["step_time_s"] for r in kept], [r["wall_s"] for r in kept], c.global_batch_size)
    summary["mean_of_samples_per_s_metric"] = statistics.mean(r["samples_per_s_metric"] for r in kept)
    # CPU inside the steady window: from rank 0's log of step `warmup` to its log of step steps-1 (ms timestamps).
    summary.update(sampler.window(stamps[warmup - 1], stamps[steps - 2], len(kept) * c.global_batch_size))
    return {"ray_init_s": ray_init_s, "run_stage_s": run_stage_s, "run_stage_phases": phases, "started_at": t_epoch,
            "steps": result.steps,
            "end_to_end_samples_per_s": c.global_batch_size * steps / run_stage_s, "cpu": cpu, "steady": summary,
            "per_step": records}  # fmt: skip


# ---------------------------------------------------------------------------------------------- profiling
def _profiled_loop(out_dir: str):
    """A `train_loop_per_worker` that runs the real StageRecipe with timers around its parts (see module doc)."""

    def loop(loop_config: dict[str, Any]) -> None:
        import json as _json
        import time as _time
        from pathlib import Path as _Path

        entered_at = _time.time()

        import ray.train
        import torch
        import torch.distributed as torch_dist

        import jobs.recipe as recipe_mod
        import jobs.shards as shards_mod
        from jobs.stage_config import StageConfig

        steps: list[dict[str, float]] = [{}]
        clock = {"last": None}

        def add(name: str, dt: float) -> None:
            cur = steps[-1]
            cur[name] = cur.get(name, 0.0) + dt

        def timed(name: str, fn):
            def wrapper(*args, **kwargs):
                t0 = _time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    add(name, _time.perf_counter() - t0)

            return wrapper

        class Dist:  # the recipe's `dist`, with its per-step statistics all-reduce timed
            def __getattr__(self, name):
                return getattr(torch_dist, name)

            def all_reduce(self, *args, **kwargs):
                t0 = _time.perf_counter()
                out = torch_dist.all_reduce(*args, **kwargs)
                now = _time.perf_counter()
                add("stats_all_reduce", now - t0)
                if clock["last"] is not None:
                    steps[-1]["step_wall"] = now - clock["last"]
                clock["last"] = now
                steps.append({})
                return out

        recipe_mod.dist = Dist()
        recipe_mod.collate = timed("collate", recipe_mod.collate)
        shards_mod.ShardSet.rows = timed("shard_rows", shards_mod.ShardSet.rows)
        log = recipe_mod.MetricLogger.log

        def timed_log(self, step, metrics):  # after the all-reduce: belongs to the step that just ended
            t0 = _time.perf_counter()
            log(self, step, metrics)
            steps[-2]["mlflow_log"] = _time.perf_counter() - t0

        recipe_mod.MetricLogger.log = timed_log

        imported_at = _time.time()
        if "secrets" in loop_config:  # as jobs.train.train_loop_per_worker does, where run_stage passes them
            import os as _os

            import ray

            _os.environ.update(ray.get(loop_config["secrets"]))
        ctx = ray.train.get_context()
        config = StageConfig.from_dict(loop_config["stage"])
        recipe = recipe_mod.StageRecipe(config, loop_config["run"], ctx.get_world_rank(), ctx.get_world_size())
        t0 = _time.perf_counter()
        recipe.setup(None)
        setup_s = _time.perf_counter() - t0
        engine = recipe.engine
        forward, backward, step = engine.forward, engine.backward, engine.step

        def eng_backward(*args, **kwargs):
            name = "backward_boundary" if engine.is_gradient_accumulation_boundary() else "backward_accum"
            return timed(name, backward)(*args, **kwargs)

        def eng_step(*args, **kwargs):
            name = "engine_step_boundary" if engine.is_gradient_accumulation_boundary() else "engine_step_accum"
            return timed(name, step)(*args, **kwargs)

        engine.forward = timed("forward", forward)
        engine.backward = eng_backward
        engine.step = eng_step
        save = recipe.save_checkpoint
        recipe.save_checkpoint = timed("checkpoint", save)
        recipe.train()
        _Path(out_dir, f"rank{ctx.get_world_rank()}.json").write_text(
            _json.dumps(
                {
                    "setup_s": setup_s,
                    "torch_threads": torch.get_num_threads(),
                    "entered_at": entered_at,
                    "imported_at": imported_at,
                    "steps": steps[:-1],
                    "tail": steps[-1],
                }
            )
        )

    return loop


def profile_job(shards: Path, steps: int, warmup: int) -> dict[str, Any]:
    out_dir = Path(tempfile.mkdtemp(prefix="bench-train-profile-"))
    try:
        run = job(shards, steps, warmup, profile_dir=out_dir)
        ranks = {}
        for rank in range(2):
            data = json.loads((out_dir / f"rank{rank}.json").read_text())
            kept = steady(data["steps"], warmup, steps)
            keys = sorted({k for s in kept for k in s})
            mean = {k: statistics.mean(s.get(k, 0.0) for s in kept) for k in keys}
            timed_parts = sum(v for k, v in mean.items() if k not in ("step_wall", "mlflow_log"))
            mean["other_in_step"] = statistics.mean(r["step_time_s"] for r in steady(run["per_step"], warmup, steps))
            mean["other_in_step"] -= timed_parts
            ranks[f"rank{rank}"] = {
                "run_stage_start_to_loop_entered_s": data["entered_at"] - run["started_at"],
                "imports_in_loop_s": data["imported_at"] - data["entered_at"],
                "setup_s": data["setup_s"],
                "torch_threads": data["torch_threads"],
                "mean_per_step_s": mean,
                "checkpoint_s": data["tail"].get("checkpoint"),
            }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"run": {k: v for k, v in run.items() if k != "per_step"}, "ranks": ranks}


# ---------------------------------------------------------------------------------------------- report
def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """The goal's verdict from uncontended runs only: on 2 cores, another process's load decides these numbers."""

    def clean(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in runs if r["steady"].get("other_cores") is not None
                and r["steady"]["other_cores"] <= CONTENDED_CORES]  # fmt: skip

    bare, job_runs = clean(result["bare"]), clean(result["job"])
    out: dict[str, Any] = {"contended_cores_threshold": CONTENDED_CORES,
                           "uncontended_runs": {"bare": len(bare), "job": len(job_runs)}}  # fmt: skip
    if not bare or not job_runs:
        return {**out, "goal_verdict": "inconclusive", "goal_met": None, "ratio_uncontended": None}
    ratio = max(j["steady"]["samples_per_s"] for j in job_runs) / max(b["steady"]["samples_per_s"] for b in bare)
    met = ratio >= GOAL_RATIO
    return {**out, "goal_verdict": "met" if met else "missed", "goal_met": met, "ratio_uncontended": ratio}


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        f"| {result['steady_steps']}, samples/s (steady) | bare, {BARE_THREADS} threads | bare, {REFERENCE_THREADS} "
        "thread (ref.) | job (run_stage, 2 workers, ZeRO-2) | job / bare 2 thr | job / bare 1 thr |",
        "|---|---|---|---|---|---|",
    ]
    runs = zip(result["bare"], result["bare_1_thread"], result["job"], strict=True)
    for i, (b, b1, j) in enumerate(runs):
        for key, label in (("samples_per_s", "step time (job: metric)"),
                           ("wall_samples_per_s", "wall per step (job: incl. MLflow write)"),
                           ("samples_per_cpu_s", "per CPU-second of ours (load-robust)")):  # fmt: skip
            x, x1, y = b["steady"][key], b1["steady"][key], j["steady"][key]
            ratios = f"{y / x:.2f}x | {y / x1:.2f}x"
            lines.append(f"| run {i + 1}: {label} | {x:.1f} | {x1:.1f} | {y:.1f} | {ratios} |")
        lines.append(f"| run {i + 1}: median step, s | {b['steady']['median_step_s']:.3f} | "
                     f"{b1['steady']['median_step_s']:.3f} | {j['steady']['median_step_s']:.3f} | | |")  # fmt: skip
        lines.append(f"| run {i + 1}: steady window: cores ours / others'; load1 before→after | {_load(b)} | "
                     f"{_load(b1)} | {_load(j)} | | |")  # fmt: skip
    lines.append(f"| best runs (step time) | {s['bare_best_samples_per_s']:.1f} | "
                 f"{s['bare_1_thread_best_samples_per_s']:.1f} | {s['job_best_samples_per_s']:.1f} | "
                 f"{s['ratio_best']:.2f}x | {s['ratio_best_vs_1_thread']:.2f}x |")  # fmt: skip
    if s["goal_verdict"] == "inconclusive":
        lines.append(f"\nGoal (job ≥ {GOAL_RATIO}x bare, 2 threads): **inconclusive** — other processes used more "
                     f"than {CONTENDED_CORES} cores during the steady steps of every bare (2 threads) or every job run "
                     f"(uncontended: {s['uncontended_runs']['bare']} bare, {s['uncontended_runs']['job']} job); "
                     "compare samples per CPU-second instead, or rerun on an idle machine.")  # fmt: skip
    else:
        lines.append(f"\nGoal (job ≥ {GOAL_RATIO}x bare, 2 threads), uncontended runs only: "
                     f"**{s['ratio_uncontended']:.2f}x, {s['goal_verdict']}**.")  # fmt: skip
    lines += ["", f"| job end to end ({result['steps']} steps) | ray.init | run_stage | start→step 1 logged | "
              "steps 1→last | last step→return | samples / run_stage s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, j in enumerate(result["job"]):
        ph = j["run_stage_phases"]
        lines.append(f"| run {i + 1} | {j['ray_init_s']:.1f} s | {j['run_stage_s']:.1f} s | "
                     f"{ph['start_to_step1_logged_s']:.1f} s | {ph['step1_to_last_step_logged_s']:.1f} s | "
                     f"{ph['last_step_logged_to_end_s']:.1f} s | {j['end_to_end_samples_per_s']:.1f} |")  # fmt: skip
    lines += ["", f"Same work: per-step loss, job (run 1) vs bare ({s['loss_compared_bare_threads']} thread(s)), "
              f"max abs diff over steps 1–{s['loss_compared_steps']}: {s['max_loss_diff']:.1e} "
              f"(step 1: {s['loss_diff_step1']:.1e})."]  # fmt: skip
    short = [f"run {i + 1} {b['threads']} thr: steps {result['warmup'] + 1}–{b['steps_done']}"
             for i, bs in enumerate(zip(result["bare"], result["bare_1_thread"], strict=True)) for b in bs
             if b["stopped_early"]]  # fmt: skip
    if short:
        lines.append(f"Bare runs stopped at --bare-budget (steady steps measured): {'; '.join(short)}.")
    lines += ["", "| text padding per micro-batch (epoch 0; epochs 0–4 pooled) | grouped by length | random |",
              "|---|---|---|"]  # fmt: skip
    for name, pad in result["padding"].items():
        for stat in ("mean", "p90", "position_weighted"):
            cells = []
            for mode in ("grouped", "random"):
                e0, pooled = pad[mode]["epoch0"][stat], pad[mode][f"epochs0-{PAD_EPOCHS - 1}"][stat]
                cells.append(f"{e0:.3f}; {pooled:.3f}")
            lines.append(f"| {name} ({pad['grouped']['epoch0']['micro_batches']} micro-batches): {stat} | "
                         f"{cells[0]} | {cells[1]} |")  # fmt: skip
    if result.get("profile"):
        prof = result["profile"]
        ranks = [prof["ranks"][f"rank{r}"] for r in range(2)]
        steady_run = prof["run"]["steady"]
        lines += ["", f"| job step breakdown, mean s per step (instrumented run: {steady_run['samples_per_s']:.1f} "
                  f"samples/s metric, {steady_run['wall_samples_per_s']:.1f} wall) | rank 0 | rank 1 |",
                  "|---|---|---|"]  # fmt: skip
        for key in sorted(set(ranks[0]["mean_per_step_s"]) | set(ranks[1]["mean_per_step_s"])):
            cells = " | ".join(f"{r['mean_per_step_s'].get(key, 0.0):.4f}" for r in ranks)
            lines.append(f"| {key} | {cells} |")
        lines.append(f"| torch threads per worker | {' | '.join(str(r['torch_threads']) for r in ranks)} |")
        for key in ("run_stage_start_to_loop_entered_s", "imports_in_loop_s", "setup_s", "checkpoint_s"):
            cells = " | ".join("n/a" if r[key] is None else f"{r[key]:.2f}" for r in ranks)
            lines.append(f"| {key} (once) | {cells} |")
    return "\n".join(lines)


def _load(run: dict[str, Any]) -> str:
    st, cpu = run["steady"], run["cpu"]
    workers = f" (train workers {st['ray_train_worker_cores']:.2f})" if st.get("ray_train_worker_cores") else ""
    return (f"{st['our_cores']:.2f}{workers} / {st['other_cores']:.2f}; "
            f"{cpu['load1_before']:.1f}→{cpu['load1_after']:.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of steady state (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="bare + job pairs (default: %(default)s)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the extra, instrumented job run (step breakdown)")  # fmt: skip
    parser.add_argument(
        "--bare-budget",
        type=float,
        default=90.0,
        metavar="S",
        help="stop a bare run after S s of steps (then fewer steady steps; default: %(default)s)",
    )
    parser.add_argument("--wait-quiet", type=float, default=10.0, metavar="S",
                        help="before each run wait up to S s for an idle machine (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (default: %(default)s)")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only re-print the table of an earlier result file (refreshing its goal verdict)",
    )
    args = parser.parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        result["summary"].update(verdict(result))
        args.report.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        return 0
    if args.warmup < 1 or args.steps < args.warmup + 3:
        parser.error(
            "--warmup must be >= 1 and --steps must leave at least 2 steady steps after it (the last step is left out)"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    train_shards, mix_shards, built_s = ensure_data()
    print(f"data: {DATA_ROOT} ({'cached' if built_s is None else f'built in {built_s:.1f} s'})", flush=True)
    pad = {"stage-1 shards (captions)": padding(train_shards), "full mixture shards": padding(mix_shards)}

    bare_runs, bare1_runs, job_runs, quiet = [], [], [], []
    for r in range(args.repeats):
        quiet.append({"bare": wait_quiet(args.wait_quiet, threshold=0.3)})
        print(f"[{r + 1}/{args.repeats}] bare loop ...", flush=True)
        bare_runs.append(bare_loop(train_shards, args.steps, args.warmup, BARE_THREADS, args.bare_budget))
        print(f"  {bare_runs[-1]['steady']['samples_per_s']:.1f} samples/s over steps {args.warmup + 1}–"
              f"{min(bare_runs[-1]['steps_done'], args.steps - 1)}", flush=True)  # fmt: skip
        quiet[-1]["bare_1_thread"] = wait_quiet(args.wait_quiet, threshold=0.3)
        print(f"[{r + 1}/{args.repeats}] bare loop, {REFERENCE_THREADS} thread ...", flush=True)
        bare1_runs.append(bare_loop(train_shards, args.steps, args.warmup, REFERENCE_THREADS, args.bare_budget))
        print(f"  {bare1_runs[-1]['steady']['samples_per_s']:.1f} samples/s over steps {args.warmup + 1}–"
              f"{min(bare1_runs[-1]['steps_done'], args.steps - 1)}", flush=True)  # fmt: skip
        quiet[-1]["job"] = wait_quiet(args.wait_quiet, threshold=0.3)
        print(f"[{r + 1}/{args.repeats}] job (run_stage) ...", flush=True)
        job_runs.append(job(train_shards, args.steps, args.warmup))
        last = job_runs[-1]
        print(f"  {last['steady']['samples_per_s']:.1f} samples/s; run_stage {last['run_stage_s']:.1f} s", flush=True)
    profile = None
    if args.profile:
        print("profiled job ...", flush=True)
        profile = profile_job(train_shards, args.steps, args.warmup)

    bare_best = max(b["steady"]["samples_per_s"] for b in bare_runs)
    job_best = max(j["steady"]["samples_per_s"] for j in job_runs)
    bare1_best = max(b["steady"]["samples_per_s"] for b in bare1_runs)
    longest = max(bare_runs + bare1_runs, key=lambda b: b["steps_done"])  # the loss check wants the most steps
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(longest["per_step"], job_runs[0]["per_step"], strict=False)]
    result: dict[str, Any] = {
        "description": __doc__.splitlines()[0],
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg_start": load_start,
            "load_avg_end": os.getloadavg(),
        },  # fmt: skip
        "versions": _versions(),
        "config": {**stage_config(train_shards, args.steps).to_dict(), "data": str(train_shards.relative_to(REPO))},
        "data": {**DATA_PARAMS, "built_s": built_s},
        "steps": args.steps,
        "warmup": args.warmup,
        "steady_steps": f"steps {args.warmup + 1}–{args.steps - 1}",
        "quiet_waits": quiet,
        "summary": {
            "bare_best_samples_per_s": bare_best,
            "job_best_samples_per_s": job_best,
            "ratio_best": job_best / bare_best,
            "ratio_per_repeat": [
                j["steady"]["samples_per_s"] / b["steady"]["samples_per_s"]
                for b, j in zip(bare_runs, job_runs, strict=True)
            ],  # fmt: skip
            "wall_ratio_per_repeat": [
                j["steady"]["wall_samples_per_s"] / b["steady"]["wall_samples_per_s"]
                for b, j in zip(bare_runs, job_runs, strict=True)
            ],  # fmt: skip
            "bare_1_thread_best_samples_per_s": bare1_best,
            "ratio_best_vs_1_thread": job_best / bare1_best,
            "ratio_best_vs_best_bare": job_best / max(bare_best, bare1_best),
            "goal_ratio": GOAL_RATIO,
            "max_loss_diff": max(diffs),
            "loss_compared_steps": len(diffs),
            "loss_compared_bare_threads": longest["threads"],
            "loss_diff_step1": diffs[0],
        },
        "bare": bare_runs,
        "bare_1_thread": bare1_runs,
        "job": job_runs,
        "profile": profile,
        "padding": pad,
        "total_s": time.perf_counter() - t_all,
    }
    result["summary"].update(verdict(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print()
    print(table(result))
    print(f"\ntotal {result['total_s']:.0f} s; wrote {args.out}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "deepspeed", "ray", "mlflow", "transformers", "timm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


if __name__ == "__main__":
    raise SystemExit(main())

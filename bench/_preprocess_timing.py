"""The timed sides of bench/preprocess.py: a CPU meter, the plain PIL loop, Ray start-up and the pipeline run."""

from __future__ import annotations

import io
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import system_cpu
from _preprocess_data import CACHE_ROOT


class CpuMeter:
    """Busy CPU cores over an interval: the whole machine (/proc/stat), ours, and everybody else's.

    Ours = this process and all its descendants — on a local Ray instance the GCS, raylet, idle workers, Ray
    Data's helper actors and our actors. A thread samples the process tree every `interval` s and keeps each
    process's last CPU time, so processes that end (actors do, and some are re-parented first) still count.
    """

    def __init__(self, interval: float = 0.25) -> None:
        import threading

        import psutil

        self._me, self._interval = psutil.Process(), interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._sample(initial=True)
        self.system, self.t0 = system_cpu(), time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, initial: bool = False) -> None:
        import psutil

        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self._first.setdefault(p.pid, t.user + t.system if initial else 0.0)
            self._last[p.pid] = t.user + t.system
            if p.pid not in self._kind:
                self._kind[p.pid] = _kind(p, self._me)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def read(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        system, wall = system_cpu(), time.perf_counter() - self.t0
        ours = sum(self._last[pid] - self._first[pid] for pid in self._last) / wall
        self.cpu_s_by_kind: dict[str, float] = {}
        for pid, last in self._last.items():
            kind = self._kind.get(pid, "other")
            self.cpu_s_by_kind[kind] = self.cpu_s_by_kind.get(kind, 0.0) + last - self._first[pid]
        if self.system is None or system is None or system[1] == self.system[1]:
            return {"machine": None, "ours": ours, "others": None}
        machine = (system[0] - self.system[0]) / (system[1] - self.system[1]) * (os.cpu_count() or 1)
        return {"machine": machine, "ours": ours, "others": max(0.0, machine - ours)}


def _kind(process, me) -> str:
    """What a process of our tree is, for the CPU split: this process (the driver), a Ray daemon, a worker."""
    import psutil

    if process.pid == me.pid:
        return "driver"
    try:
        cmd = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    if "default_worker.py" in cmd or cmd.startswith("ray::"):
        return "ray workers (actors, tasks)"
    return "ray daemons (gcs, raylet, agents)"


def warm_page_cache(root: Path, items: list[dict[str, Any]]) -> None:
    (root / "annotations.jsonl").read_bytes()
    for it in items:
        (root / it["image"]).read_bytes()


def plain_loop(root: Path, items: list[dict[str, Any]], config, first: int | None = None) -> dict[str, Any]:
    """The per-sample work of one epoch of a lazy LLaVA dataset, in this process, stage by stage. `first`: also
    report the CPU seconds spent on the first `first` items (`cpu_s_first`)."""
    from convllava.processing.image_processing import load_image
    from pipelines.worker import build_processor

    t = time.perf_counter()
    processor = build_processor(config)  # tokenizer + template + image processor, as the pipeline's actors do
    build_s = time.perf_counter() - t
    ip = processor.image_processor
    stages = dict.fromkeys(("read", "decode", "resize", "encode", "tokenize"), 0.0)
    buckets: Counter[str] = Counter()
    visual_tokens = total_length = 0
    meter, cpu0 = CpuMeter(), time.process_time()
    start = time.perf_counter()
    cpu_first = None
    for i, it in enumerate(items):
        if i == first:
            cpu_first = time.process_time() - cpu0
        t0 = time.perf_counter()
        data = (root / it["image"]).read_bytes()
        t1 = time.perf_counter()
        image = load_image(data, max_pixels=config.max_pixels, background=ip.fill)
        if min(image.size) < config.min_image_side:
            raise RuntimeError(f"{it['image']} is too small")
        t2 = time.perf_counter()
        resized, p = ip.resize(image)
        t3 = time.perf_counter()
        buf = io.BytesIO()
        resized.save(buf, format="JPEG", quality=config.jpeg_quality)
        t4 = time.perf_counter()
        sample = processor.tokenize(it["conversations"], [(p.canvas_height, p.canvas_width)], sample_id=it["id"])
        t5 = time.perf_counter()
        for name, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name] += dt
        buckets[f"{p.canvas_height}x{p.canvas_width}"] += 1
        visual_tokens += sample.num_image_tokens
        total_length += len(sample.input_ids)
    seconds = time.perf_counter() - start
    return {
        "images": len(items),
        "seconds": seconds,
        "images_per_s": len(items) / seconds,
        "cpu_s": time.process_time() - cpu0,
        "cpu_ms_per_image": (time.process_time() - cpu0) / len(items) * 1e3,
        **({"first": first, "cpu_s_first": cpu_first} if first is not None else {}),
        "cpu_cores": meter.read(),
        "processor_build_s": build_s,
        "stage_ms_per_image": {k: v / len(items) * 1e3 for k, v in stages.items()},
        "buckets": dict(sorted(buckets.items())),
        "visual_tokens": visual_tokens,
        "mean_length": total_length / len(items),
    }


def start_ray(num_cpus: int) -> tuple[float, float]:
    """Start a local Ray instance; then wait (at most 30 s) until its processes are idle — `ray.init` returns
    while the workers it prestarts are still importing. Returns (init seconds, settle seconds)."""
    import psutil
    import ray
    import ray.data

    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False

    def tree_cpu() -> float:
        total = 0.0
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    settle = time.perf_counter()
    before = tree_cpu()
    while time.perf_counter() - settle < 30.0:
        time.sleep(1.0)
        now = tree_cpu()
        if now - before < 0.1:  # Ray's processes used under 0.1 cores over the last second
            break
        before = now
    return init_s, time.perf_counter() - settle


def pipeline(root: Path, n: int, config, annotations: str = "annotations.jsonl") -> dict[str, Any]:
    """`run_preprocess` of the `n` records in `annotations` (a file in `root`) end to end into a fresh directory
    (deleted afterwards); Ray must already be running."""
    import ray

    import pipelines.preprocess as pp
    from pipelines.config import Mixture, Source

    ray_stage = {}
    original = pp._process

    def timed_process(*args, **kwargs):  # the Ray Data stage alone, to split driver work from the job
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            ray_stage["seconds"] = time.perf_counter() - t

    output = CACHE_ROOT / "runs" / f"out-{os.getpid()}-{int(time.time())}"
    if output.exists():
        shutil.rmtree(output)
    mixture = Mixture(sources=(Source(name="bench", annotations=str(root / annotations), image_root=str(root)),))
    lines: list[str] = []
    pp._process = timed_process
    try:
        meter = CpuMeter()
        start = time.perf_counter()
        result = pp.run_preprocess(mixture, config, str(output), echo=lines.append)
        seconds = time.perf_counter() - start
        cores = meter.read()
    finally:
        pp._process = original
    by_kind = {k: v / n * 1e3 for k, v in sorted(meter.cpu_s_by_kind.items())}
    output_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    shutil.rmtree(output)
    m = result.manifest
    return {
        "images": m.written,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "cpu_cores": cores,
        "cpu_s": cores["ours"] * seconds,  # driver + GCS, raylet, workers and actors (this process tree)
        "cpu_ms_per_image": cores["ours"] * seconds / n * 1e3,
        "cpu_ms_per_image_by_process": by_kind,
        "ray_data_stage_s": ray_stage.get("seconds"),
        "driver_other_s": seconds - ray_stage.get("seconds", 0.0),
        "manifest": {
            k: getattr(m, k)
            for k in ("read", "written", "quarantined", "reconciled", "buckets", "visual_tokens", "mean_length")
        }
        | {"padded_pixel_fraction": m.padded_pixel_fraction, "shards": len(m.shards)},
        "output_bytes": output_bytes,
        "units": math.ceil(n / config.unit_size),
        **dict(zip(("actors", "threads"), config.actors(int(ray.cluster_resources()["CPU"])), strict=True)),
        "unit_size": config.unit_size,
    }

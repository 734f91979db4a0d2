"""Preprocessing throughput (Ray Data pipeline vs a plain loop) and padded pixels (bucket vs square mode).

Data: `--images` (default 2,000) seeded synthetic images, generated once into `work/bench-preprocess/` and reused.
Both sides lie in 640..2048 px and the aspect ratio in 1:3..3:1 (half drawn from common photo ratios 1:1, 4:3, 3:2,
16:9 and their transposes, half log-uniform). Content: a colour gradient plus 5–25 random ellipses, rectangles and
lines; JPEGs (90%, quality 80–95) get mild Gaussian noise (σ≈5) so they compress like photos (~0.1–0.2 bytes/px),
PNGs (10%) are flat graphics like screenshots and diagrams. 5% of the JPEGs carry EXIF orientation 6 (stored
rotated, shown upright). One LLaVA JSONL record per image with a short Vicuna conversation (1–2 turns).

1. Throughput, images/s over the same images, `PreprocessConfig(resolution=768, workers=2)` (bucket mode, JPEG q95,
   tiny tokenizer, Vicuna v1 template):

   - plain loop: one process, what LLaVA's lazy dataset does per sample every epoch — read the file's bytes,
     decode (`load_image`: EXIF rotation, RGB), choose bucket + resize/pad (`ConvLlavaImageProcessor.resize`),
     re-encode JPEG q95, tokenize with the template (`ConvLlavaProcessor.tokenize`). The processor (tokenizer
     load) is built before timing; nothing is written. Runs before Ray starts, so no Ray process competes.
   - pipeline: `pipelines.preprocess.run_preprocess` end to end into a fresh output directory — reading the
     annotations, fingerprinting, the Ray Data job (actor start-up, tokenizer load per actor, the per-sample work,
     Parquet shards), index, manifest and histogram. Ray is started before timing
     (`ray.init(num_cpus=2, include_dashboard=False)`, then up to 30 s until its prestarted workers are idle;
     both reported separately) and `run_preprocess` joins it; Ray Data progress bars are off. The time of its
     Ray Data stage (`_process`) is reported too.

   Both must account for every image: the manifest must say written == images, quarantined == 0, and the plain
   loop's bucket counts and visual-token total must equal the manifest's. Goal: pipeline >= 1.5x plain loop.
   The page cache is warmed (every file read once) before either is timed.

   Other load spoils wall-clock numbers on 2 cores, so the script (a) waits, before each timed phase, up to
   `--wait-quiet` seconds for an idle machine, (b) measures the busy cores of the whole machine (/proc/stat) and
   of our own process tree (this process + all Ray processes, sampled every 0.25 s) during each phase, and marks
   the run CONTENDED when the plain loop got under 0.95 of a core or other processes kept over 0.25 cores busy
   during the pipeline, and (c) reports CPU time per image, which load hardly changes: plain loop (this process)
   and pipeline (driver + every Ray process), and the ratio they allow at best on 2 idle cores,
   2 x plain / pipeline.

2. Padded-pixel fraction at resolution 768, `ConvLlavaImageProcessor(resolution=768, mode=...)
   .target(w, h).padded_fraction` per image over the upright (post-EXIF) sizes: plain mean and mean weighted by
   canvas pixels, for `bucket` and `square`; for the benchmark images and for the demo data set's images
   (`pipelines.demo_data.generate_demo_data`, small counts, in a temporary directory). Goal: bucket <= 5%.

Run (about 3 minutes on 2 idle CPU cores, plus about a minute the first time to generate the images):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python bench/preprocess.py [--images 2000] \
        [--out bench/results/preprocess.json]

It prints a markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import system_cpu, wait_quiet  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "preprocess.json"
CACHE_ROOT = REPO / "work" / "bench-preprocess"
GENERATOR_VERSION = 1
RESOLUTION = 768
WORKERS = 2
RAY_CPUS = 2
GOAL_RATIO = 1.5
GOAL_PADDED = 0.05
# A timed phase is CONTENDED (its wall-clock time not valid) when the single-process plain loop got under 0.95 of a
# core, or when other processes kept more than 0.25 cores busy on average while the pipeline (which wants both) ran.
PLAIN_MIN_CORES = 0.95
CONTENDED_CORES = 0.25
SIDE_MIN, SIDE_MAX, MAX_ASPECT = 640, 2048, 3.0
COMMON_RATIOS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)
PNG_FRACTION, EXIF_FRACTION = 0.10, 0.05
NOISE_SIGMA, NOISE_TILE = 5.0, 512
PROMPTS = (
    "Describe the image briefly.",
    "What is in this image?",
    "Give a short description of the picture.",
    "Write a caption for this image.",
)
FOLLOW_UPS = ("How many shapes are there?", "Which colour dominates?", "Is there a line in the picture?")


# ---------------------------------------------------------------------------------------------- data set
def plan(n: int, seed: int) -> list[dict[str, Any]]:
    """Per image: upright size, format, EXIF rotation and its conversation — a pure function of (n, seed)."""
    rng = np.random.default_rng([seed, 0])
    items = []
    for i in range(n):
        if rng.random() < 0.5:
            aspect = float(COMMON_RATIOS[rng.integers(len(COMMON_RATIOS))])  # width / height
        else:
            aspect = float(math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
        r = max(aspect, 1 / aspect)  # short side drawn so that the long side stays within SIDE_MAX
        short = int(rng.integers(SIDE_MIN, int(SIDE_MAX / r) + 1))
        long = min(SIDE_MAX, max(SIDE_MIN, round(short * r)))
        width, height = (long, short) if aspect >= 1 else (short, long)
        fmt = "png" if rng.random() < PNG_FRACTION else "jpg"
        rotated = fmt == "jpg" and rng.random() < EXIF_FRACTION
        n_shapes = int(rng.integers(5, 26))
        turns = [(f"<image>\n{PROMPTS[rng.integers(len(PROMPTS))]}", f"A picture of {n_shapes} shapes on a gradient.")]
        if rng.random() < 0.5:
            turns.append((FOLLOW_UPS[rng.integers(len(FOLLOW_UPS))], f"There are {n_shapes} shapes; look closely."))
        conversations = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        items.append(
            {
                "id": f"img-{i:06d}",
                "image": f"images/img_{i:06d}.{fmt}",
                "width": width,
                "height": height,
                "fmt": fmt,
                "exif_rotated": rotated,
                "n_shapes": n_shapes,
                "conversations": conversations,
            }
        )
    return items


def render(args: tuple[dict[str, Any], int, int, str]) -> int:
    """Write one image; returns its file size. Stored rotated (EXIF orientation 6) when `exif_rotated`."""
    item, seed, index, root = args
    rng = np.random.default_rng([seed, 1, index])
    w, h = (item["height"], item["width"]) if item["exif_rotated"] else (item["width"], item["height"])
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    c0, cx, cy = rng.uniform(40, 215, 3), rng.uniform(-100, 100, 3), rng.uniform(-100, 100, 3)
    base = (c0 + cx * x + cy * y).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    for _ in range(item["n_shapes"]):
        x1, x2 = sorted(int(v) for v in rng.integers(0, w, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, h, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x1, y1, x2, y2), fill=colour)
        elif kind == 1:
            draw.rectangle((x1, y1, x2, y2), fill=colour)
        else:
            draw.line((x1, y1, x2, y2), fill=colour, width=int(rng.integers(2, 24)))
    path = Path(root) / item["image"]
    if item["fmt"] == "png":
        image.save(path, "PNG")
    else:
        # Tiled Gaussian noise (a random offset into one 512² tile): JPEG codes 8×8 blocks independently, so
        # this compresses like full-frame noise at a fraction of the cost of drawing it.
        tile = np.random.default_rng([seed, 2]).normal(0.0, NOISE_SIGMA, (NOISE_TILE, NOISE_TILE, 3))
        oy, ox = (int(v) for v in rng.integers(0, NOISE_TILE, 2))
        reps = (h // NOISE_TILE + 2, w // NOISE_TILE + 2, 1)
        noise = np.tile(tile.astype(np.int16), reps)[oy : oy + h, ox : ox + w]
        pixels = (np.asarray(image, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
        exif = Image.Exif()
        if item["exif_rotated"]:
            exif[0x0112] = 6  # display rotated 90° clockwise: stored h×w becomes upright w×h
        Image.fromarray(pixels).save(path, "JPEG", quality=int(rng.integers(80, 96)), exif=exif)
    return path.stat().st_size


def ensure_dataset(n: int, seed: int) -> tuple[Path, list[dict[str, Any]], float | None]:
    """The cached data set for (n, seed), generated on first use. Returns (root, plan, seconds spent generating)."""
    root = CACHE_ROOT / f"data-n{n}-seed{seed}-v{GENERATOR_VERSION}"
    items = plan(n, seed)
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()).get("images") == n:
        return root, items, None
    start = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sizes = list(pool.map(render, [(it, seed, i, str(root)) for i, it in enumerate(items)], chunksize=16))
    with (root / "annotations.jsonl").open("w") as f:
        for it in items:
            f.write(json.dumps({"id": it["id"], "image": it["image"], "conversations": it["conversations"]}) + "\n")
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"images": n, "seed": seed, "bytes": sum(sizes), "seconds": round(seconds, 1)}) + "\n")
    return root, items, seconds


def dataset_stats(root: Path, items: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = [(root / it["image"]).stat().st_size for it in items]
    jpg = [(s, it) for s, it in zip(sizes, items, strict=True) if it["fmt"] == "jpg"]
    aspects = [it["width"] / it["height"] for it in items]
    return {
        "images": len(items),
        "png": sum(it["fmt"] == "png" for it in items),
        "exif_rotated": sum(it["exif_rotated"] for it in items),
        "bytes_total": sum(sizes),
        "bytes_mean": sum(sizes) / len(sizes),
        "jpeg_bytes_per_pixel": sum(s for s, _ in jpg) / sum(it["width"] * it["height"] for _, it in jpg),
        "megapixels_mean": sum(it["width"] * it["height"] for it in items) / len(items) / 1e6,
        "side_range": [
            min(min(it["width"], it["height"]) for it in items),
            max(max(it["width"], it["height"]) for it in items),
        ],
        "aspect_range": [min(aspects), max(aspects)],
    }


# ---------------------------------------------------------------------------------------------- measuring
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

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def read(self) -> dict[str, float | None]:
        self._stop.set()
        self._thread.join()
        self._sample()
        system, wall = system_cpu(), time.perf_counter() - self.t0
        ours = sum(self._last[pid] - self._first[pid] for pid in self._last) / wall
        if self.system is None or system is None or system[1] == self.system[1]:
            return {"machine": None, "ours": ours, "others": None}
        machine = (system[0] - self.system[0]) / (system[1] - self.system[1]) * (os.cpu_count() or 1)
        return {"machine": machine, "ours": ours, "others": max(0.0, machine - ours)}


def warm_page_cache(root: Path, items: list[dict[str, Any]]) -> None:
    (root / "annotations.jsonl").read_bytes()
    for it in items:
        (root / it["image"]).read_bytes()


def plain_loop(root: Path, items: list[dict[str, Any]], config) -> dict[str, Any]:
    """The per-sample work of one epoch of a lazy LLaVA dataset, in this process, stage by stage."""
    from convllava.image_processing import load_image
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
    for it in items:
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
        "cpu_cores": meter.read(),
        "processor_build_s": build_s,
        "stage_ms_per_image": {k: v / len(items) * 1e3 for k, v in stages.items()},
        "buckets": dict(sorted(buckets.items())),
        "visual_tokens": visual_tokens,
        "mean_length": total_length / len(items),
    }


def start_ray() -> tuple[float, float]:
    """Start a local Ray instance; then wait (at most 30 s) until its processes are idle — `ray.init` returns
    while the workers it prestarts are still importing. Returns (init seconds, settle seconds)."""
    import psutil
    import ray
    import ray.data

    start = time.perf_counter()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
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


def pipeline(root: Path, n: int, config) -> dict[str, Any]:
    """`run_preprocess` end to end into a fresh directory (deleted afterwards); Ray must already be running."""
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
    mixture = Mixture((Source("bench", str(root / "annotations.jsonl"), str(root)),))
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
    output_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    shutil.rmtree(output)
    m = result.manifest
    return {
        "images": m["written"],
        "seconds": seconds,
        "images_per_s": n / seconds,
        "cpu_cores": cores,
        "cpu_s": cores["ours"] * seconds,  # driver + GCS, raylet, workers and actors (this process tree)
        "cpu_ms_per_image": cores["ours"] * seconds / n * 1e3,
        "ray_data_stage_s": ray_stage.get("seconds"),
        "driver_other_s": seconds - ray_stage.get("seconds", 0.0),
        "manifest": {
            k: m[k] for k in ("read", "written", "quarantined", "reconciled", "buckets", "visual_tokens", "mean_length")
        }
        | {"padded_pixel_fraction": m["padded_pixel_fraction"], "shards": len(m["shards"])},
        "output_bytes": output_bytes,
        "units": math.ceil(n / config.unit_size),
        "unit_size": config.unit_size,
    }


def padded(sizes: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Padded fraction per mode over (width, height) sizes: plain mean, and weighted by canvas pixels."""
    from convllava.image_processing import ConvLlavaImageProcessor

    out = {}
    for mode in ("bucket", "square"):
        ip = ConvLlavaImageProcessor(resolution=RESOLUTION, mode=mode)
        targets = [ip.target(w, h) for w, h in sizes]
        canvas = [p.canvas_height * p.canvas_width for p in targets]
        fractions = [p.padded_fraction for p in targets]
        out[mode] = {
            "mean": sum(fractions) / len(fractions),
            "pixel_weighted": sum(f * c for f, c in zip(fractions, canvas, strict=True)) / sum(canvas),
            "max": max(fractions),
            "images": len(sizes),
        }
    return out


def demo_sizes() -> list[tuple[int, int]]:
    """Upright sizes of the demo data set's images (rendered scenes + shipped photos), small counts."""
    from convllava.image_processing import load_image
    from pipelines.demo_data import generate_demo_data

    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_data(Path(tmp) / "demo", seed=0, n_caption=300, n_instruct=0, n_eval=0, with_photos=True)
        return [load_image(p).size for p in sorted((Path(tmp) / "demo" / "images").rglob("*")) if p.is_file()]


# ---------------------------------------------------------------------------------------------- report
def contention(r: dict[str, Any]) -> str:
    bad = [k.replace("_", " ") for k, v in r["contended"].items() if v]
    if bad:
        return f"**CONTENDED ({', '.join(bad)}): timings not valid**"
    return f"plain >= {PLAIN_MIN_CORES}, others <= {CONTENDED_CORES} (idle enough)"


def _quiet_note(q: dict[str, Any]) -> str:
    if q["quiet"] is None:
        return "not waiting for an idle machine"
    state = "idle" if q["quiet"] else "NOT idle"
    return f"machine {state} after waiting {q['waited_s']:.0f} s"


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(r: dict[str, Any]) -> str:
    plain, pipe, pad = r["plain_loop"], r["pipeline"], r["padded_fraction"]
    ratio = r["throughput_ratio"]
    stage = fmt(pipe["ray_data_stage_s"], ".1f")
    verdict = "not judged" if any(r["contended"].values()) else "met" if ratio >= GOAL_RATIO else "missed"
    lines = [
        f"| measure ({r['images']} images, R={RESOLUTION}) | value | goal |",
        "|---|---|---|",
        f"| plain loop, 1 process (images/s) | {plain['images_per_s']:.2f} ({plain['seconds']:.1f} s) | |",
        f"| Ray Data pipeline, {WORKERS} workers on {RAY_CPUS} CPUs, end to end (images/s) | "
        f"{pipe['images_per_s']:.2f} ({pipe['seconds']:.1f} s; Ray Data stage {stage} s) | |",
        f"| pipeline / plain loop | **{ratio:.2f}x** | >= {GOAL_RATIO}x ({verdict}) |",
        f"| Ray start-up, not in the pipeline's time: `ray.init` + until Ray is idle | "
        f"{r['ray_init_s']:.1f} s + {r['ray_settle_s']:.1f} s | |",
        f"| CPU time per image: plain loop / pipeline (driver + all Ray processes) | "
        f"{plain['cpu_ms_per_image']:.1f} / {pipe['cpu_ms_per_image']:.1f} ms | |",
        f"| best ratio the CPU time allows on {RAY_CPUS} idle cores ({RAY_CPUS} x plain / pipeline CPU per image) | "
        f"{r['cpu_bound_ratio']:.2f}x | |",
        f"| cores while timing: plain loop ours / others; pipeline ours / others | "
        f"{plain['cpu_cores']['ours']:.2f} / {fmt(plain['cpu_cores']['others'], '.2f')}; "
        f"{pipe['cpu_cores']['ours']:.2f} / {fmt(pipe['cpu_cores']['others'], '.2f')} | "
        f"{contention(r)} |",
    ]
    for name, key in (("benchmark images", "bench"), ("demo data set", "demo")):
        if key not in pad:
            continue
        for mode in ("bucket", "square"):
            p = pad[key][mode]
            goal = f"<= {GOAL_PADDED:.0%} {'(met)' if p['pixel_weighted'] <= GOAL_PADDED else '(missed)'}"
            lines.append(
                f"| padded pixels, `{mode}`, {name} ({p['images']} images): pixel-weighted / mean | "
                f"{p['pixel_weighted']:.2%} / {p['mean']:.2%} | {goal if mode == 'bucket' else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="number of images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path (default: %(default)s)")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo data set's padded-pixel numbers")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        metavar="S",
        help="before each timed phase wait up to S s for an idle machine (0: don't wait; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be >= 1")

    from pipelines.config import PreprocessConfig

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    root, items, gen_s = ensure_dataset(args.images, args.seed)
    print(f"data: {root} ({'cached' if gen_s is None else f'generated in {gen_s:.1f} s'})", flush=True)
    config = PreprocessConfig(resolution=RESOLUTION, workers=WORKERS)
    warm_page_cache(root, items)

    quiet = {"plain_loop": wait_quiet(args.wait_quiet, threshold=0.2)}
    print(f"plain loop ({_quiet_note(quiet['plain_loop'])}) ...", flush=True)
    plain = plain_loop(root, items, config)
    print(f"  {plain['images_per_s']:.2f} images/s", flush=True)
    quiet["pipeline"] = wait_quiet(args.wait_quiet, threshold=0.2)
    print(f"ray.init + pipeline ({_quiet_note(quiet['pipeline'])}) ...", flush=True)
    ray_init_s, ray_settle_s = start_ray()
    print(f"ray.init: {ray_init_s:.1f} s (+ {ray_settle_s:.1f} s until Ray was idle); pipeline ...", flush=True)
    try:
        pipe = pipeline(root, args.images, config)
    finally:
        import ray

        ray.shutdown()
    print(f"  {pipe['images_per_s']:.2f} images/s", flush=True)

    m = pipe["manifest"]
    checks = {
        "manifest_written_equals_images": m["written"] == args.images,
        "manifest_quarantined_zero": m["quarantined"] == 0,
        "plain_processed_equals_images": plain["images"] == args.images,
        "same_buckets": plain["buckets"] == m["buckets"],
        "same_visual_tokens": plain["visual_tokens"] == m["visual_tokens"],
    }
    contended = {
        "plain_loop": plain["cpu_cores"]["ours"] < PLAIN_MIN_CORES,
        "pipeline": (pipe["cpu_cores"]["others"] or 0.0) > CONTENDED_CORES,
    }
    pad = {"bench": padded([(it["width"], it["height"]) for it in items])}
    if not args.no_demo:
        pad["demo"] = padded(demo_sizes())
    checks["manifest_padded_matches_bucket"] = math.isclose(
        m["padded_pixel_fraction"], pad["bench"]["bucket"]["pixel_weighted"], rel_tol=1e-4, abs_tol=1e-6
    )

    result = {
        "description": __doc__.splitlines()[0],
        "images": args.images,
        "seed": args.seed,
        "config": config.to_dict(),
        "dataset": {"root": str(root.relative_to(REPO)), **dataset_stats(root, items), "generated_s": gen_s},
        "plain_loop": plain,
        "ray_init_s": ray_init_s,
        "ray_settle_s": ray_settle_s,
        "pipeline": pipe,
        "throughput_ratio": pipe["images_per_s"] / plain["images_per_s"],
        "cpu_bound_ratio": RAY_CPUS * plain["cpu_ms_per_image"] / pipe["cpu_ms_per_image"],
        "goal_ratio": GOAL_RATIO,
        "padded_fraction": pad,
        "goal_padded_fraction": GOAL_PADDED,
        "checks": checks,
        "quiet_before": quiet,
        "contended": contended,
        "environment": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "python": platform.python_version(),
            "ray": __import__("ray").__version__,
            "pillow": Image.__version__,
        },
        "elapsed_s": time.perf_counter() - t_all,
    }
    print()
    print(markdown(result))
    print()
    stages = ", ".join(f"{k} {v:.1f}" for k, v in plain["stage_ms_per_image"].items())
    print(f"plain loop ms/image: {stages}; processor build {plain['processor_build_s']:.2f} s")
    for name, r in (("plain loop", plain), ("pipeline", pipe)):
        c = r["cpu_cores"]
        print(f"CPU cores busy during {name}: ours {c['ours']:.2f}, other processes {fmt(c['others'], '.2f')}")
    if any(contended.values()):
        print(f"WARNING: other load during {' and '.join(k for k, v in contended.items() if v)}; rerun when idle")
    print(f"checks: {', '.join(f'{k}={v}' for k, v in checks.items())}. Took {result['elapsed_s']:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

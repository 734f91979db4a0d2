"""Preprocessing at scale: the driver's peak memory and the throughput of `convllava preprocess` as records grow, and
an incremental re-run with 1% of the records changed.

    python bench/preprocess_scale.py --sizes 200000,2000000 --baseline-commit <sha> --out bench/results/preprocess_scale.json

The input is generated (seeded): LLaVA-style JSONL, text-only records plus `--image-fraction` of records with an
image drawn from a small set of generated files. Each size runs `python -m jobs.cli preprocess` in a process of its
own on the embedded Ray; its driver's peak RSS is the kernel's high-water mark (`VmHWM` in /proc/PID/status, polled
until it exits: the mark only grows). With `--baseline-commit`, the same command of that commit (a git worktree)
runs on `--baseline-size` records (600k: the issue's "today at 600k") in the same session: the ratios are against
it. With `--incremental`, the largest size is run again after 1% of its records changed their answer: the processed
count and the time against the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import wait_quiet

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "bench-preprocess-scale"
N_IMAGES = 200
WORDS = (
    "the a red blue green large small image shows picture person car dog cat tree sky building street table "
    "window two three several left right near far bright dark people standing sitting holding looking"
).split()


def make_images(root: Path) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        path = root / "images" / f"img_{i:03d}.jpg"
        if path.exists():
            continue
        w, h = rng.choice([(320, 240), (240, 320), (400, 200), (300, 300), (480, 270)])
        image = Image.new("RGB", (w, h), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(255, 255, 255))
        image.save(path, quality=90)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def record(i: int, image_fraction: float, version: int = 0) -> dict[str, Any]:
    rng = random.Random(i)
    turns = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        question = sentence(rng, rng.randint(5, 15)) + "?"
        answer = sentence(rng, rng.randint(10, 40)) + (f" (revised {version})" if version else "")
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    rec = {"id": f"r{i:08d}", "conversations": turns}
    if rng.random() < image_fraction:
        rec["image"] = f"images/img_{i % N_IMAGES:03d}.jpg"
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return rec


def write_input(root: Path, n: int, image_fraction: float, changed_every: int = 0) -> Path:
    """data.jsonl of n records; with `changed_every`, every such record's answers carry a revision mark."""
    make_images(root)
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            version = 1 if changed_every and i % changed_every == 0 else 0
            f.write(json.dumps(record(i, image_fraction, version)) + "\n")
    return path


def run_preprocess(code: Path, annotations: Path, output: Path, resolution: int) -> dict[str, Any]:
    """`convllava preprocess` of `code` (a checkout) in a process of its own: wall time and the driver's peak RSS."""
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "preprocess",
        "--annotations",
        str(annotations),
        "--image-root",
        str(annotations.parent),
        "--output",
        str(output),
        "--resolution",
        str(resolution),
        "--max-length",
        "1024",
    ]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess failed ({proc.returncode}):\n{out[-4000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "driver_peak_rss_mib": round(peak / 2**20, 1),
        "read": manifest["read"],
        "written": manifest["written"],
        "processed": manifest["run"]["processed"],
        "records_per_s": round(manifest["read"] / wall, 1),
        "loadavg_before": [round(x, 2) for x in load],
    }


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def baseline_checkout(commit: str) -> Path:
    path = WORK / f"code-{commit[:12]}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200000,2000000", help="record counts, comma-separated")
    parser.add_argument("--image-fraction", type=float, default=0.05)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--baseline-commit", help="a commit whose preprocess runs `--baseline-size` for comparison")
    parser.add_argument("--baseline-size", type=int, default=600_000, help="records the baseline runs on")
    parser.add_argument("--incremental", action="store_true", help="re-run the largest size with 1%% changed")
    parser.add_argument("--work", default=str(WORK), help="where inputs and outputs go")
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for an idle machine")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), **wait_quiet(args.quiet_wait, 0.3)},
        "config": {"image_fraction": args.image_fraction, "resolution": args.resolution, "sizes": sizes},
        "runs": {},
    }
    for n in sizes:
        data = write_input(work / f"n{n}", n, args.image_fraction)
        out = work / f"n{n}" / "out"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        result["runs"][str(n)] = run = run_preprocess(ROOT, data, out, args.resolution)
        print(f"{n} records: {run}", flush=True)
    if args.baseline_commit:
        n = args.baseline_size
        data = write_input(work / f"n{n}", n, args.image_fraction)
        out = work / f"n{n}" / "out-baseline"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        code = baseline_checkout(args.baseline_commit)
        base = run_preprocess(code, data, out, args.resolution)
        result["baseline"] = {"commit": args.baseline_commit, "size": n, **base}
        print(f"baseline {n} records: {base}", flush=True)
    if args.incremental:
        n = sizes[-1]
        data = write_input(work / f"n{n}", n, args.image_fraction, changed_every=100)
        again = run_preprocess(ROOT, data, work / f"n{n}" / "out", args.resolution)
        again["fraction_of_full_run"] = round(again["wall_s"] / result["runs"][str(n)]["wall_s"], 3)
        result["incremental"] = again
        print(f"incremental (1% changed): {again}", flush=True)
    small, large = (result["runs"][str(sizes[0])], result["runs"][str(sizes[-1])])
    result["summary"] = {
        "driver_peak_rss_growth": round(large["driver_peak_rss_mib"] / small["driver_peak_rss_mib"], 3),
        "driver_peak_rss_slope_bytes_per_record": round(
            (large["driver_peak_rss_mib"] - small["driver_peak_rss_mib"]) * 2**20 / max(1, sizes[-1] - sizes[0]), 2
        ),
    }
    if "baseline" in result:
        result["summary"]["throughput_vs_baseline"] = round(
            large["records_per_s"] / result["baseline"]["records_per_s"], 3
        )
        result["summary"]["driver_rss_largest_vs_baseline"] = round(
            large["driver_peak_rss_mib"] / result["baseline"]["driver_peak_rss_mib"], 3
        )
    result["machine"]["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()

"""Human-facing outputs of preprocessing: the summary table, histograms and the code version."""

from __future__ import annotations

import io
import math
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from convllava.data.shards import Manifest


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    try:
        v = version("convllava")
    except PackageNotFoundError:
        v = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{v}+{commit}" if commit else v


def length_histogram(lengths: list[int], max_length: int) -> dict[str, list[int]]:
    """Counts of sequence lengths (visual tokens included) in power-of-two bins up to max_length."""
    edges = [0] + [2**i for i in range(4, max(5, math.ceil(math.log2(max(max_length, 16))) + 1))]
    if edges[-1] < max_length:
        edges.append(max_length)
    counts = [0] * (len(edges) - 1)
    for n in lengths:
        for i in range(len(edges) - 1):
            if edges[i] < n <= edges[i + 1] or (i == 0 and n == 0):
                counts[i] += 1
                break
        else:
            counts[-1] += 1
    return {"edges": edges, "counts": counts}


def summary_table(m: Manifest) -> str:
    lines = [
        f"{'source':24s} {'available':>9s} {'read':>7s} {'written':>8s} {'quarant.':>8s}",
        *(f"{n:24s} {s.available:9d} {s.read:7d} {s.written:8d} {s.quarantined:8d}" for n, s in m.sources.items()),
        "",
        f"{'bucket':12s} {'samples':>8s}",
        *(f"{b:12s} {n:8d}" for b, n in m.buckets.items()),
    ]
    if m.quarantine_reasons:
        lines += ["", "quarantined: " + ", ".join(f"{k} {v}" for k, v in m.quarantine_reasons.items())]
    ok = "✓" if m.reconciled else "✗ MISMATCH"
    lines += [
        "",
        f"read {m.read} = written {m.written} + quarantined {m.quarantined} {ok}   "
        f"(this run: processed {m.run.processed}, reused {m.run.reused}, removed {m.run.removed}, {m.run.seconds}s)",
        f"padded pixels {m.padded_pixel_fraction:.2%}, visual tokens {m.visual_tokens}, "
        f"mean length {m.mean_length:.1f} tokens",
    ]
    return "\n".join(lines)


ASPECT_BINS = [2 ** (x / 4) for x in range(-10, 11)]  # original aspect ratios (W / H) from 1:5.7 to 5.7:1


def bucket_histogram_png(buckets: dict[str, int], aspect_counts: list[int]) -> bytes:
    """Bar chart of samples per bucket and a histogram of the original aspect ratios (log scale): `aspect_counts`
    are the written samples' counts in ASPECT_BINS (aggregated over the index's partitions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(buckets, key=lambda b: (b == "text", _aspect(b)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(range(len(names)), [buckets[n] for n in names])
    left.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    left.set_title("samples per bucket (H x W)")
    if any(aspect_counts):
        right.hist(ASPECT_BINS[:-1], bins=ASPECT_BINS, weights=aspect_counts)
        right.set_xscale("log")
        ticks = [0.25, 0.5, 1, 2, 4]
        right.set_xticks(ticks, [f"{t:g}" for t in ticks])
        right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_title("original aspect ratio (W / H)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _aspect(bucket: str) -> float:
    if not bucket[:1].isdigit():  # the text-only bucket
        return math.inf
    h, w = bucket.split("x")
    return int(w) / int(h)

"""Machine-load helpers the benchmark scripts share: busy jiffies from /proc/stat and waiting for an idle machine.

The scripts run as `python bench/NAME.py`, so this folder is on `sys.path` and they import it as `_common`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def system_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat; None where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def wait_quiet(max_wait: float, threshold: float, windows: int = 3) -> dict[str, Any]:
    """Wait (at most `max_wait` s) until the machine has been idle — under `threshold` busy cores — for `windows`
    consecutive seconds, so that nobody else's work is timed with ours. Reports whether it got there."""
    start, quiet, busy = time.perf_counter(), 0, None
    while time.perf_counter() - start < max_wait:
        a = system_cpu()
        time.sleep(1.0)
        b = system_cpu()
        if a is None or b is None:
            return {"quiet": None, "waited_s": 0.0}
        busy = (b[0] - a[0]) / max(1, b[1] - a[1]) * (os.cpu_count() or 1)
        quiet = quiet + 1 if busy < threshold else 0
        if quiet >= windows:
            return {"quiet": True, "waited_s": round(time.perf_counter() - start, 1)}
    return {
        "quiet": False if max_wait > 0 else None,
        "waited_s": round(time.perf_counter() - start, 1),
        "last_busy_cores": busy,
    }

"""Starting or joining Ray the same way everywhere: embedded local instance by default, a cluster by address."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or `RAY_ADDRESS`), else start a local instance without the dashboard.

    A no-op when Ray is already initialised in this process (tests share one instance per session).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)

"""Starting or joining Ray the same way everywhere (embedded local instance by default, a cluster by address), and
handing the driver's settings and credentials to Ray workers the same way everywhere."""

from __future__ import annotations

import os
import sys
from typing import Any

# Settings workers need from the driver's environment; they travel in the runtime env (visible in Ray's state).
WORKER_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "CONVLLAVA_CACHE",
    "CONVLLAVA_SAMPLE_LEDGER",  # jobs.train.recipe.LEDGER_ENV: on a shared volume, every node writes there
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
# Credentials reach the workers through the object store, never through the runtime env: Ray writes every runtime
# env it creates, env_vars included, into runtime_env_agent.log on each node and keeps it in its job/Train state.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or `RAY_ADDRESS`), else start a local instance.

    The local instance runs the dashboard process: it serves Ray's State API, without which Ray Train's placement
    group cleaner prints "Failed to query Ray Train Controller actor state" every few seconds of every stage.
    Ray Data's own console lines (execution plans, progress dumps when stdout is not a terminal) go to Ray's log
    files only (`quiet_ray_data_console`); its warnings and errors still reach the screen.
    A no-op when Ray is already initialised in this process (tests share one instance per session).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray()
    if "ray.data" in sys.modules:  # a Ray Data job is about to run (a training stage does not import it)
        quiet_ray_data_console()


def start_local_ray() -> None:
    """Start this process's own local Ray instance, whose processes ask their own dashboard for Ray's State API
    (`ray.init()` without an address: it joins the machine's current cluster instead when `ray start --head` or
    `ray.cluster_utils` recorded one).

    Without an address, Ray's State API client (what Ray Train's placement-group cleaner uses to watch its
    controller) looks for "the" local instance; with a second one on the machine (another pipeline's, a test
    session's) it fails with "Found multiple active Ray instances", and with a stale current-cluster file it would
    watch another instance's actors. The dashboard gets a port chosen here, and `RAY_API_SERVER_ADDRESS`, which the
    State API client reads before anything else, names it in the environment that Ray's processes inherit as they
    start. This process's own environment is restored afterwards.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=True)
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def alive_nodes() -> list[dict[str, Any]]:
    """The nodes of the Ray cluster this process joined that are alive (`ray.nodes()` keeps dead ones)."""
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def quiet_ray_data_console() -> None:
    """Ray Data logs INFO to the console (plans, progress) and everything to `ray-data.log` in the session's log
    folder: keep the file, raise the console handler to WARNING. In a terminal its progress bars stay. Call after
    `ray.data` is imported (importing it configures that logger)."""
    import logging

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)


def worker_runtime_env(defaults: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The runtime env for workers: the driver's WORKER_ENV values over `defaults`; None when there is nothing
    to pass (an empty runtime env still costs Ray a separate worker pool on some paths)."""
    env = {**(defaults or {}), **{k: os.environ[k] for k in WORKER_ENV if k in os.environ}}
    return {"env_vars": env} if env else None


def share_secrets() -> dict[str, Any]:
    """The driver's credentials, put in the object store; pass the result to workers and `adopt_secrets` it there.

    The reference sits inside a dict so that Ray hands it to the worker unresolved (the value never becomes part
    of a task or actor spec)."""
    import ray

    return {"ref": ray.put({k: os.environ[k] for k in SECRET_ENV if k in os.environ})}


def adopt_secrets(shared: dict[str, Any] | None) -> None:
    """On a worker: set the credentials that `share_secrets` put in the object store, before anything reads them."""
    if shared:
        import ray

        os.environ.update(ray.get(shared["ref"]))

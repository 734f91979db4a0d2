"""`convllava submit` / `convllava jobs`: run any convllava command as a Ray job on a cluster.

The command is checked against the local CLI before it is sent (a typo fails here, not an hour later on the
cluster). The job's working dir is shipped through the runtime env, minus the virtualenv and work dirs.
"""

from __future__ import annotations

import shlex
import time

EXCLUDES = [".venv", "work", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(command: list[str]) -> str:
    """`convllava …` for the cluster, after checking that the local CLI accepts the arguments."""
    from jobs.cli import build_parser

    if not command:
        raise ValueError("nothing to submit: give the convllava command after --, e.g. -- pipeline run --config ...")
    try:
        build_parser().parse_args(command)
    except SystemExit:
        raise ValueError(f"not a valid convllava command: {shlex.join(command)}") from None
    return "convllava " + shlex.join(command)


def submit(address: str, command: list[str], working_dir: str = ".", env: dict[str, str] | None = None) -> str:
    """Submit `convllava <command>`; returns the job id."""
    import os

    env_vars = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env_vars.update(env or {})
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    return _client(address).submit_job(
        entrypoint=entrypoint(command), runtime_env=runtime_env, metadata={"submitted_by": "convllava"}
    )


def follow(address: str, job_id: str, out=None) -> str:
    """Print the job's log as it grows (to `out`, default stdout) until the job ends; returns its final status
    (`SUCCEEDED`, `FAILED` or `STOPPED`)."""
    import asyncio
    import sys

    out = out or sys.stdout
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())  # ends when the job does
    return wait_for(address, job_id)


def wait_for(address: str, job_id: str, poll_s: float = 1.0) -> str:
    """The job's final status, once it has one."""
    from ray.job_submission import JobStatus

    client = _client(address)
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(poll_s)
    return str(status.value)


def job_status(address: str, job_id: str) -> str:
    info = _client(address).get_job_info(job_id)
    return f"{job_id} {info.status.value} {info.message or ''}".strip()


def job_logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> str:
    stopped = _client(address).stop_job(job_id)
    return f"{job_id} {'stop requested' if stopped else 'was not running'}"

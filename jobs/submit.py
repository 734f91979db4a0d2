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


def submit(
    address: str, command: list[str], working_dir: str = ".", wait: bool = False, env: dict[str, str] | None = None
) -> str:
    """Submit `convllava <command>`; returns the job id (or, with `wait`, follows it and returns its final status)."""
    import os

    env_vars = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    env_vars.update(env or {})
    runtime_env = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    client = _client(address)
    job_id = client.submit_job(
        entrypoint=entrypoint(command), runtime_env=runtime_env, metadata={"submitted_by": "convllava"}
    )
    if not wait:
        return job_id
    status = wait_for(address, job_id)
    print(client.get_job_logs(job_id))
    return f"{job_id} {status}"


def wait_for(address: str, job_id: str, poll_s: float = 1.0) -> str:
    from ray.job_submission import JobStatus

    client = _client(address)
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(poll_s)


def job_status(address: str, job_id: str) -> str:
    info = _client(address).get_job_info(job_id)
    return f"{job_id} {info.status.value} {info.message or ''}".strip()


def job_logs(address: str, job_id: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> str:
    stopped = _client(address).stop_job(job_id)
    return f"{job_id} {'stop requested' if stopped else 'was not running'}"

"""Real tracking servers that tests stop and start again, as a restarted tracking server would be: `mlflow server` on
SQLite with local artifacts (`mlflow_server`), and as infra/mlflow deploys it (`deployed_mlflow`): on PostgreSQL, with
its artifacts proxied into S3 (moto's server)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` that can be stopped and started again on the same port and backend, as a restarted
    tracking server would be. By default on SQLite with local artifacts; `backend` (e.g. PostgreSQL's URI) and
    `artifacts` (an `s3://` destination the server proxies, `--serve-artifacts`) make it the deployed kind."""

    def __init__(
        self, root: Path, backend: str | None = None, artifacts: str | None = None, env: dict | None = None
    ) -> None:
        self.root, self.port = root, free_port()
        self.db, self.artifacts, self.log = root / "mlflow.db", root / "artifacts", root / "server.log"
        self.backend = backend or f"sqlite:///{self.db}"
        self.store_args = (
            ["--serve-artifacts", "--artifacts-destination", artifacts]
            if artifacts
            else ["--default-artifact-root", str(self.artifacts)]
        )
        self.env = env or {}
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> float:
        """Start and wait until /health answers; returns when it did (time.time())."""
        cmd = [
            MLFLOW,
            "server",
            "--backend-store-uri",
            self.backend,
            *self.store_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # no job runner: less load on 2 cores
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        with open(self.log, "a") as log:  # new session: stop() ends uvicorn, which `mlflow server` spawns, too
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.time()
            except OSError:
                time.sleep(0.5)

    def stop(self) -> float:
        """Terminate the server (its whole process group); returns when the port stopped answering."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        while True:  # uvicorn (a child) may outlive its parent for a moment
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(0.2)
            except OSError:
                return time.time()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH), or None."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """A real PostgreSQL server in a fresh data folder, on a free port of 127.0.0.1, with a `mlflow` database.

    PostgreSQL refuses to run as root, so when this process is root the server runs as the `postgres` user (what
    Debian's package creates), in a folder under /tmp that user owns (pytest's own temp folders are root's alone).
    """

    def __init__(self, bindir: Path) -> None:
        self.bin, self.port = bindir, free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="convllava-pg-"))
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.uri = f"postgresql://postgres@127.0.0.1:{self.port}/mlflow"

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(
            [str(self.bin / cmd[0]), *cmd[1:]], user=self.user, cwd=self.root, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        import psycopg

        with psycopg.connect(self.uri.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")

    def query(self, sql: str, *params) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri) as db:
            return db.execute(sql, params).fetchall()

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """PostgreSQL as the deployment runs it; skips, saying why, where it cannot run here."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed: `make install` installs Debian's postgresql when run as root")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no `postgres` user to run PostgreSQL as (it refuses root): install Debian's postgresql")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def deployed_mlflow(postgres, s3_server, tmp_path_factory):
    """`mlflow server` as infra/mlflow/mlflow.yaml runs it: PostgreSQL backend store, artifacts proxied by the server
    (`--serve-artifacts`) into an S3 bucket (moto's server), so clients never touch the bucket's MLflow prefix."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="mlflow-artifacts")
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_server, **{k: os.environ[k] for k in keys}}
    server = MlflowServer(tmp_path_factory.mktemp("deployed-mlflow"), postgres.uri, "s3://mlflow-artifacts/mlflow", env)
    server.start()
    yield server
    server.stop()

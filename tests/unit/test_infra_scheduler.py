"""The retraining CronJob's scheduler script, run against a fake Kubernetes API: it creates the RayJob and
waits for it, fails with it, and skips a tick while a retraining RayJob is still active."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from infra_harness import SCHEDULED_RAYJOB, SCHEDULER_CONFIGMAP


@pytest.fixture()
def fake_kubernetes():
    """An HTTP stand-in for the API server's rayjobs endpoints, recording every request."""
    state = {"items": [], "statuses": [], "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, body: dict, code: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            state["requests"].append(("GET", self.path, self.headers["Authorization"], None))
            if "?" in self.path:
                self._reply({"items": state["items"]})
            elif state["statuses"]:
                self._reply({"metadata": {"name": self.path.rsplit("/", 1)[1]}, "status": state["statuses"].pop(0)})
            else:  # nothing more scripted: the RayJob is gone, which ends the scheduler's wait
                self._reply({"kind": "Status", "code": 404}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["requests"].append(("POST", self.path, self.headers["Authorization"], body))
            self._reply({**body, "metadata": {**body["metadata"], "name": "convllava-retrain-x7k2p"}}, 201)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def _run_scheduler(tmp_path: Path, api: str) -> subprocess.CompletedProcess:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "namespace").write_text("convllava\n")
    (sa / "token").write_text("t0k3n\n")
    for key in ("schedule.py", "rayjob.yaml"):
        (tmp_path / key).write_text(SCHEDULER_CONFIGMAP["data"][key])
    env = {
        **os.environ,
        "SERVICEACCOUNT_DIR": str(sa),
        "KUBERNETES_API": api,
        "POLL_SECONDS": "0",
        "RAYJOB_TEMPLATE": str(tmp_path / "rayjob.yaml"),
    }
    return subprocess.run(
        [sys.executable, str(tmp_path / "schedule.py")], env=env, capture_output=True, text=True, timeout=60
    )


def _rayjob(name: str, deployment_status: str | None) -> dict:
    status = {} if deployment_status is None else {"jobDeploymentStatus": deployment_status}
    return {"metadata": {"name": name}, "status": status}


def test_scheduler_creates_the_rayjob_and_waits_until_it_succeeds(tmp_path, fake_kubernetes):
    api, state = fake_kubernetes
    state["items"] = [_rayjob("convllava-retrain-old1", "Complete"), _rayjob("convllava-retrain-old2", "Failed")]
    state["statuses"] = [
        {},
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
    ]
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 0, result.stdout + result.stderr
    methods = [r[0] for r in state["requests"]]
    assert methods == ["GET", "POST", "GET", "GET", "GET", "GET"]  # list, create, four polls until Complete
    collection = "/apis/ray.io/v1/namespaces/convllava/rayjobs"
    listing, create = state["requests"][:2]
    assert listing[1].startswith(collection + "?")
    assert parse_qs(urlsplit(listing[1]).query)["labelSelector"] == [
        "app.kubernetes.io/component=retrain,app.kubernetes.io/name=convllava"
    ]
    assert create[1] == collection and create[3] == SCHEDULED_RAYJOB  # the ConfigMap's RayJob, unchanged
    assert {r[2] for r in state["requests"]} == {"Bearer t0k3n"}
    assert all(r[1] == f"{collection}/convllava-retrain-x7k2p" for r in state["requests"][2:])
    assert "created rayjob/convllava-retrain-x7k2p" in result.stdout


def test_scheduler_fails_when_the_ray_job_fails(tmp_path, fake_kubernetes):
    api, state = fake_kubernetes
    state["statuses"] = [{"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}]
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 1
    assert "Complete, Ray job FAILED" in result.stdout


@pytest.mark.parametrize("active_status", [None, "Initializing", "Running", "Suspended"])
def test_scheduler_skips_the_tick_while_a_retraining_rayjob_is_active(tmp_path, fake_kubernetes, active_status):
    api, state = fake_kubernetes
    state["items"] = [_rayjob("convllava-retrain-old", "Complete"), _rayjob("convllava-retrain-busy", active_status)]
    result = _run_scheduler(tmp_path, api)
    assert result.returncode == 0, result.stderr
    assert [r[0] for r in state["requests"]] == ["GET"]  # listed, nothing created
    assert "skipped" in result.stdout and "convllava-retrain-busy" in result.stdout

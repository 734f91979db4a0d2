"""The MLflow UI as a user sees it after a pipeline: a real `mlflow server` on 127.0.0.1 over the pipeline's store,
pages rendered by headless Chromium (Debian's `chromium`, driven by Playwright), screenshots and page text.

    python tools/mlflow_screenshots.py --workdir work/demo --experiment convllava-demo --out docs/images

writes `runs.png` (the experiment's training runs, the pipeline's parent run expanded to its five node runs),
`eval_run.png` (the eval run: metrics, datasets, the logged model), `eval_chart.png` (its accuracy-vs-chance chart)
and `stage_system_metrics.png` (a stage run's system metrics). The README shows the first two.

MLflow 3.17's UI opens every experiment in its GenAI view unless the browser chose "Model training" (it keeps that
choice in local storage and ignores the experiment's `mlflow.experimentKind` tag); the pages here, like the link
`convllava` prints, carry `?workflowType=machine_learning`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VIEWPORT = {"width": 1600, "height": 1000}
ML_VIEW = "workflowType=machine_learning"
TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tracking_uri: str, port: int | None = None, ready_s: float = 120.0):
    """`mlflow server` on 127.0.0.1 over `tracking_uri` (one worker); yields its base URL, stops it after."""
    port = port or _free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--backend-store-uri",
            tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server on {base} did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def api(base: str, endpoint: str, **params) -> dict:
    """GET `/api/2.0/mlflow/ENDPOINT` on the server (what the UI itself calls)."""
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{endpoint}?{urlencode(params)}", timeout=30) as r:
        return json.loads(r.read())


def post(base: str, endpoint: str, body: dict) -> dict:
    """POST a JSON body to `/api/2.0/mlflow/ENDPOINT` on the server (searches take their filters this way)."""
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def pipeline_runs(base: str, experiment: str) -> tuple[str, dict, dict[str, dict]]:
    """The experiment id, the latest pipeline parent run and its node runs by node name, from the REST API."""
    exp = api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    body = {"experiment_ids": [exp["experiment_id"]], "max_results": 200, "order_by": ["attributes.start_time DESC"]}
    runs = post(base, "runs/search", body).get("runs", [])

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parent = next(r for r in runs if "convllava.node" not in tags(r) and "convllava.pipeline" in tags(r))
    nodes = {
        tags(r)["convllava.node"]: r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]
    }
    return exp["experiment_id"], parent, nodes


def capture(base: str, experiment: str, out: Path) -> dict[str, str]:
    """Screenshots of the pages a user looks at into `out`; returns each page's visible text by page name."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    exp_id, parent, nodes = pipeline_runs(base, experiment)
    run_url = f"{base}/#/experiments/{exp_id}/runs"
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT)

        def show(name: str, url: str, ready: str, before_shot=None) -> None:
            page.goto(f"{url}?{ML_VIEW}")
            page.get_by_text(ready).first.wait_for(timeout=TIMEOUT_MS)
            close = page.get_by_role("button", name="Close")  # the assistant panel, open on every fresh page
            if close.count():
                close.first.click()
            if before_shot is not None:
                before_shot()
            page.wait_for_timeout(1500)  # charts and images finish drawing
            texts[name] = page.inner_text("body")
            page.screenshot(path=str(out / f"{name}.png"))

        def expand_parent() -> None:  # the parent run's node runs, as a user clicks them open
            page.locator("[role=gridcell]").get_by_text(parent["info"]["run_name"], exact=True).first.wait_for()
            page.locator("[role=gridcell][col-id='attributes.`Run Name`'] button").first.click()
            page.locator("[role=gridcell]").get_by_text("stage3", exact=True).first.wait_for(timeout=TIMEOUT_MS)

        eval_run = f"{run_url}/{nodes['eval']['info']['run_id']}"
        try:
            show("runs", f"{base}/#/experiments/{exp_id}", "Run Name", expand_parent)
            show("eval_run", eval_run, "demo/overall")
            show("eval_chart", f"{eval_run}/artifacts/eval/accuracy_vs_chance.png", "eval/accuracy_vs_chance.png")
            stage_run = f"{run_url}/{nodes['stage3']['info']['run_id']}"
            show("stage_system_metrics", f"{stage_run}/system-metrics", "cpu_utilization_percentage")
        finally:
            browser.close()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="work/demo", help="the pipeline's work dir (its mlflow.db)")
    parser.add_argument("--tracking-uri", help="default: sqlite:///WORKDIR/mlflow.db")
    parser.add_argument("--experiment", default="convllava-demo")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or f"sqlite:///{Path(args.workdir).resolve()}/mlflow.db"
    with mlflow_server(uri) as base:
        texts = capture(base, args.experiment, Path(args.out))
    for name in texts:
        print(f"wrote {Path(args.out) / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

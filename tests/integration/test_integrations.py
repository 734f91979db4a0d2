"""The lmms-eval and VLMEvalKit adapters on a tiny random-weight checkpoint and the demo data, offline.

lmms-eval runs for real: its own evaluator (`simple_evaluate`) in-process and its `lmms-eval` command in a
subprocess, which finds `--model convllava` through the `lmms_eval.models` entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
N_EVAL = 10

pytestmark = pytest.mark.integration


def test_lmms_eval_cli_finds_convllava_through_the_entry_point(tiny_ckpt, demo_root, offline):
    """`lmms-eval --model convllava ...` as a user runs it. The entry point comes from a dist-info folder on
    PYTHONPATH holding the same `lmms_eval.models` entry as the package's own metadata."""
    dist_info = offline / "site" / "convllava_entry_point-0.0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: convllava-entry-point\nVersion: 0.0.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[lmms_eval.models]\nconvllava = convllava.integrations:lmms_eval_manifest\n"
    )
    from convllava.integrations.lmms_eval import TASKS_DIR

    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(offline / "site")}
    env["LMMS_EVAL_DATASETS_CACHE"] = str(offline / "datasets-cache")
    out = offline / "results"
    command = [
        str(Path(sys.executable).parent / "lmms-eval"),
        "--model",
        "convllava",
        "--model_args",
        f"pretrained={tiny_ckpt},device=cpu",
        "--tasks",
        "convllava_demo_open",
        "--include_path",
        str(TASKS_DIR),
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    result = subprocess.run(command, cwd=demo_root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "|convllava_demo_open|" in result.stdout  # lmms-eval's results table
    (results_file,) = out.rglob("*_results.json")
    saved = json.loads(results_file.read_text())
    assert saved["n-samples"]["convllava_demo_open"]["effective"] == N_EVAL
    assert 0.0 <= saved["results"]["convllava_demo_open"]["exact_match,none"] <= 1.0
    (samples_file,) = out.rglob("*_samples_convllava_demo_open.jsonl")
    assert len(samples_file.read_text().splitlines()) == N_EVAL

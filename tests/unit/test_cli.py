"""The `convllava` command as a user runs it: a real subprocess through the installed console script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [str(Path(sys.executable).parent / "convllava")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=None)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    result = run("init", "--preset", "tiny", "--output", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_init_writes_safetensors_and_processor(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_chat_one_shot_and_interactive(tiny_checkpoint, photos):
    one = run(
        "chat", "--model", str(tiny_checkpoint), "--image", str(photos[1].path), "--max-new-tokens", "4", "What is it?"
    )
    assert one.returncode == 0, one.stderr
    assert one.stdout.strip()  # a random model still answers something
    session = run("chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "3", stdin="Hello\nAnd then?\n\n")
    assert session.returncode == 0, session.stderr
    assert session.stdout.count("ASSISTANT:") == 2


def test_info_reports_the_paper_tower_without_allocating():
    result = run("info", "--preset", "convllava-1536")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.startswith("vision_"))
    assert int(lines["vision_trunk"].replace(",", "")) == 196_227_264
    assert int(lines["vision_stage5"].replace(",", "")) == 472_934_400
    assert "576  at 1536x1536" in result.stdout


def test_errors_are_one_clear_line(tmp_path):
    result = run("chat", "--model", str(tmp_path / "nope"), "hi")
    assert result.returncode == 2
    assert "convllava chat: error:" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.stderr

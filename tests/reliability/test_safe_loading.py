"""Security: config and checkpoint loaders never execute what they read: no eval/exec or unpickling in the
source, YAML python tags refused, pickled checkpoints refused."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from jobs.train.config import CONFIG_DIR, StageConfig

ROOT = Path(__file__).resolve().parents[2]


SOURCE_DIRS = ("convllava", "pipelines", "jobs")
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _unsafe_calls(source: str, where: str) -> tuple[list[str], int]:
    """Calls that could execute what a config or checkpoint holds; and how many torch.load calls were checked."""
    bad, torch_loads = [], 0
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in (PICKLERS | {"yaml", "torch"}):
            names = {a.name for a in node.names}
            if names & {"load", "loads", "unsafe_load", "full_load", "load_all", "Unpickler"}:
                bad.append(f"{where}:{node.lineno}: from {node.module} import {sorted(names)}")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        line = f"{where}:{node.lineno}: {ast.unparse(node)[:100]}"
        if isinstance(func, ast.Name) and func.id in ("eval", "exec", "compile", "__import__"):
            bad.append(line)
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            continue
        owner, attr = func.value.id, func.attr
        kwargs = {k.arg: k.value for k in node.keywords}
        if owner == "yaml" and attr in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all"):
            bad.append(line)
        if owner == "yaml" and attr in ("load", "load_all"):
            loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or "SafeLoader" not in ast.unparse(loader):
                bad.append(line)
        if owner in PICKLERS and attr in ("load", "loads", "Unpickler", "open"):
            bad.append(line)
        if owner == "builtins" and attr in ("eval", "exec"):
            bad.append(line)
        if owner == "torch" and attr == "load":
            torch_loads += 1
            flag = kwargs.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                bad.append(line)
    return bad, torch_loads


def test_source_never_evaluates_or_unpickles_what_it_loads():
    bad, torch_loads, files = [], 0, 0
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            files += 1
            text = path.read_text()
            found, n = _unsafe_calls(text, str(path.relative_to(ROOT)))
            bad += found
            torch_loads += n
            bad += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"(?<![\w.])(eval|exec)\(", text)]
    assert files > 40 and not bad, bad
    assert torch_loads >= 1  # the .bin loader in convllava/modeling/weights.py, checked to pass weights_only=True
    # The scanner itself catches each pattern (so a clean result means something).
    sample = """
import pickle, yaml, torch, builtins
from pickle import loads
eval(s); exec(s); builtins.exec(s); pickle.load(f); yaml.load(s); yaml.load(s, Loader=yaml.Loader); yaml.unsafe_load(s)
torch.load(p); torch.load(p, weights_only=False)
yaml.load(s, Loader=yaml.SafeLoader); torch.load(p, weights_only=True); model.eval()
"""
    flagged, n = _unsafe_calls(sample, "sample")
    assert len(flagged) == 10 and n == 3, flagged


PAYLOADS = (
    '!!python/object/apply:os.system ["echo pwned > {file}"]',
    '!!python/object/apply:subprocess.check_call [[sh, -c, "echo pwned > {file}"]]',
    "!!python/object/apply:builtins.exec [\"open('{file}', 'w').write('pwned')\"]",
)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_yaml_loaders_refuse_python_tags(payload, tmp_path):
    from convllava.io.config import ConfigLoadError
    from jobs.dag.config import PipelineConfig
    from pipelines.config import Mixture, PreprocessConfig

    pwned = tmp_path / "pwned"
    tag = payload.format(file=pwned)
    stage_yaml = (CONFIG_DIR / "tiny" / "stage1.yaml").read_text().replace("name: stage1", f"name: {tag}")
    cases = {
        "StageConfig.from_yaml": (stage_yaml, StageConfig.from_yaml),
        "PreprocessConfig.from_yaml": (f"resolution: 256\nmode: {tag}\n", PreprocessConfig.from_yaml),
        "Mixture.from_yaml": (f"name: demo\nsources:\n  - annotations: {tag}\n", Mixture.from_yaml),
        "PipelineConfig.from_yaml": (f"name: {tag}\n", PipelineConfig.from_yaml),
        "whole document": (f"{tag}\n", StageConfig.from_yaml),
    }
    for name, (text, loader) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigLoadError) as info:
            loader(path)
        assert str(info.value).startswith(f"{path}: not valid YAML") and "python/object" in str(info.value), name
        assert not pwned.exists(), f"{name} executed the YAML's python tag"
    with pytest.raises(ConfigLoadError, match="override 'name=.*': the value is not valid YAML"):  # overrides too
        StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage1.yaml", [f"name={tag}"])
    assert not pwned.exists()
    # The payload is real: an unsafe loader would have run it.
    yaml.unsafe_load(f"x: {tag}\n")
    assert pwned.read_text().strip() == "pwned"


# ------------------------------------------------------------------------------------------------- pickled checkpoints
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious_bins(directory: Path, marker: Path) -> dict[str, Path]:
    """A torch.save zip whose pickle holds the payload next to a real tensor, and a bare (legacy-style) pickle."""
    directory.mkdir(parents=True, exist_ok=True)
    zipped, bare = directory / "zip.bin", directory / "bare.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(marker)}, zipped)
    bare.write_bytes(pickle.dumps({"x": _Payload(marker)}))
    return {"zip": zipped, "bare": bare}


@pytest.mark.parametrize("kind", ["zip", "bare"])
def test_pickled_checkpoints_are_refused(kind, tmp_path, tiny_model, tiny_processor):
    from convllava.modeling.checkpoint import load_model, save_checkpoint
    from convllava.modeling.llava_checkpoint import from_llava_checkpoint
    from convllava.modeling.weights import CheckpointError, load_state_dict

    marker = tmp_path / "pwned"
    source = _malicious_bins(tmp_path / "src", marker)[kind]

    def refused(call, file: Path) -> None:
        with pytest.raises(CheckpointError) as info:
            call()
        assert str(file) in str(info.value) and "refused to load" in str(info.value)
        assert re.search(r"\(.*unsupported .*\)", str(info.value), re.I)  # what torch's weights_only unpickler refused
        assert isinstance(info.value.__cause__, pickle.UnpicklingError)
        assert not marker.exists()

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "pytorch_model.bin").write_bytes(source.read_bytes())
    refused(lambda: load_state_dict(plain), plain / "pytorch_model.bin")

    sharded = tmp_path / "sharded"  # a shard of an indexed checkpoint
    sharded.mkdir()
    torch.save({"a": torch.ones(1)}, sharded / "pytorch_model-00001-of-00002.bin")
    (sharded / "pytorch_model-00002-of-00002.bin").write_bytes(source.read_bytes())
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "x": "pytorch_model-00002-of-00002.bin"}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(lambda: load_state_dict(sharded), sharded / "pytorch_model-00002-of-00002.bin")

    llava = tmp_path / "llava"  # a released-style LLaVA directory
    llava.mkdir()
    (llava / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava",
                "mm_hidden_size": 64,
                "hidden_size": 32,
                "vocab_size": 100,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
        )
    )
    (llava / "pytorch_model.bin").write_bytes(source.read_bytes())
    refused(lambda: from_llava_checkpoint(llava), llava / "pytorch_model.bin")

    ours = save_checkpoint(tiny_model, tiny_processor, tmp_path / "ours")  # our format, weights swapped for a pickle
    (ours / "model.safetensors").unlink()
    (ours / "pytorch_model.bin").write_bytes(source.read_bytes())
    with pytest.raises(
        CheckpointError,
        match="no model.safetensors; convllava checkpoints load from safetensors "
        r"only \(pickle-based pytorch_model.bin is never loaded here\)",
    ):
        load_model(ours)
    assert not marker.exists()

    # The payload is real: an unrestricted unpickler would have run it.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


# ------------------------------------------------------------------------------------------------- the resume path
def _rewrite_marker(checkpoint: Path, rel: str) -> None:
    """What anyone with write access to the bucket can do: make the completion markers vouch for a swapped file."""
    import hashlib

    path = checkpoint / rel
    for marker in checkpoint.glob("COMPLETE.rank*.json"):
        data = json.loads(marker.read_text())
        if rel in data["files"] or marker.name == "COMPLETE.rank0.json":
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            data["files"][rel] = {"size": path.stat().st_size, "sha256": digest}
            marker.write_text(json.dumps(data))


@pytest.mark.integration
def test_resume_never_unpickles_a_tampered_checkpoint(shards, tmp_path):
    """A stage checkpointed at step 2, then tampered with in its storage, markers rewritten to match: (1) its state
    file swapped for a pickle whose loading would create a file; (2) a DeepSpeed-style `.pt` pickle added. The same
    command resumes neither: it fails naming the file and why, and the payload never ran. Untampered, it resumes."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "train",
        "--local",
        "--config",
        str(CONFIG_DIR / "tiny" / "stage1.yaml"),
        "--workdir",
        str(tmp_path / "wd"),
        f"data={shards}",
        "workers=1",
        "global_batch_size=4",
        "max_steps=4",
        "checkpoint_every=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "wd" / "runs" / "stage1"
    shutil.rmtree(run / "checkpoint_000004")
    checkpoint = run / "checkpoint_000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoint, pristine)
    marker = tmp_path / "pwned"

    state = checkpoint / "state" / "rank0.safetensors"
    payload = pickle.dumps({"state": _Payload(marker)})
    state.write_bytes(payload)
    _rewrite_marker(checkpoint, "state/rank0.safetensors")
    swapped = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    assert swapped.returncode != 0
    assert "state/rank0.safetensors: not a safetensors file" in swapped.stderr, swapped.stderr[-3000:]
    assert not marker.exists(), "the resume path unpickled the swapped state file"

    shutil.rmtree(checkpoint)
    shutil.copytree(pristine, checkpoint)
    pt = checkpoint / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    pt.parent.mkdir(parents=True)
    torch.save({"module": {"x": torch.zeros(1)}, "x": _Payload(marker)}, pt)
    _rewrite_marker(checkpoint, "deepspeed/state/mp_rank_00_model_states.pt")
    added = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    assert added.returncode != 0
    assert "deepspeed/state/mp_rank_00_model_states.pt is a pickle" in added.stderr, added.stderr[-3000:]
    assert "refused" in added.stderr and not marker.exists()

    shutil.rmtree(checkpoint)
    shutil.copytree(pristine, checkpoint)
    clean = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resumed at step 2" in clean.stdout and not marker.exists()
    # The payload is real: an unrestricted unpickler would have run it.
    pickle.loads(payload)
    assert marker.exists()

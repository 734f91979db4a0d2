"""Loading keeps one copy of the weights: every parameter is the stored tensor in the requested dtype, shards are
read one at a time, peak memory stays near the checkpoint's size, and `convllava convert` writes our format
with identical logits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from checkpoint_harness import LLM, logits_of, reference_logits, write_llava_llm
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from convllava.modeling import llava_checkpoint, weights
from convllava.modeling.checkpoint import load_model
from convllava.modeling.llava_checkpoint import from_llava_checkpoint
from convllava.modeling.vision import checkpoint_filter_fn
from convllava.modeling.weights import CheckpointError
from convllava.processing.tokenizer import load_tokenizer
from jobs import cli


def test_every_parameter_is_the_stored_tensor_in_the_requested_dtype(released):
    model, _ = from_llava_checkpoint(released.llm_dir, dtype=torch.float16)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not [name for name, t in tensors.items() if t.is_meta]
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    stored = {f"language_model.{k}": v for k, v in released.llm.state_dict().items()}
    stored |= {f"projector.{k}": v for k, v in released.projector.state_dict().items()}
    stored |= {f"vision_tower.model.{k}": v for k, v in checkpoint_filter_fn(released.tower.state_dict()).items()}
    assert sorted(k for k in stored if "inv_freq" not in k) == sorted(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name].half()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_loaded_model_computes_the_reference_logits_exactly(released, input_ids, pixels, dtype):
    """The reference modules cast to `dtype`, with rotary inv_freq kept float32 as from_pretrained keeps it; both run
    eager attention, so the logits agree bit for bit."""
    model, _ = from_llava_checkpoint(released.llm_dir, dtype=dtype)
    model.set_attn_implementation("eager")
    tower, projector, llm = (copy.deepcopy(m).to(dtype) for m in (released.tower, released.projector, released.llm))
    llm.model.rotary_emb.inv_freq = released.llm.model.rotary_emb.inv_freq
    want = reference_logits(tower, projector, llm, input_ids, pixels.to(dtype), image_token_id=4)
    assert want.dtype == dtype
    assert torch.equal(logits_of(model, input_ids, pixels), want)


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_rotary_inv_freq_is_what_transformers_computes(released, tmp_path, rope, dtype):
    """Non-persistent buffers are in no checkpoint: computed as a fresh transformers model (and from_pretrained) has
    them, in float32 whatever the weights' dtype."""
    llm = LlamaForCausalLM(LlamaConfig(**LLM, **({"rope_parameters": rope} if rope else {})))
    llm_dir = write_llava_llm(tmp_path / "llm", llm, released.projector, released.tower_dir)
    model, _ = from_llava_checkpoint(llm_dir, dtype=dtype)
    rotary = model.language_model.model.rotary_emb
    fresh = LlamaRotaryEmbedding(llm.config)
    assert rotary.inv_freq.dtype == rotary.original_inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, fresh.inv_freq) and torch.equal(rotary.original_inv_freq, fresh.inv_freq)
    assert torch.equal(rotary.inv_freq, llm.model.rotary_emb.inv_freq)
    if rope:
        default = LlamaRotaryEmbedding(
            LlamaConfig(**LLM, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        )
        torch.testing.assert_close(rotary.inv_freq, default.inv_freq / 4.0)
    assert rotary.attention_scaling == fresh.attention_scaling


def test_loads_one_shard_at_a_time_and_never_merges_them(released, monkeypatch):
    """Each weights file is read once; when the next one is read, nothing of the previous one is alive any more
    (float32 from float16 files: the model holds converted copies), and the merged state dict is never built."""
    calls: list[str] = []
    alive: list[weakref.ref] = []
    read = weights.load_weight_file

    def spy(path):
        assert not [ref for ref in alive if ref() is not None], f"a tensor of an earlier shard is alive at {path.name}"
        calls.append(path.name)
        shard = read(path)
        alive.extend(weakref.ref(t) for t in shard.values())
        return shard

    def merged(directory):
        raise AssertionError(f"load_state_dict({directory}) merges every shard")

    monkeypatch.setattr(llava_checkpoint, "load_weight_file", spy)  # the LLM shards
    monkeypatch.setattr(weights, "load_weight_file", spy)  # the tower's, through iter_shards
    monkeypatch.setattr(weights, "load_state_dict", merged)
    model, _ = from_llava_checkpoint(released.llm_dir)
    assert calls == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_tensor_of_the_wrong_shape_names_its_file(released, tmp_path):
    state = dict(released.llm.state_dict())
    state["model.norm.weight"] = torch.ones(LLM["hidden_size"] + 1)
    llm_dir = write_llava_llm(tmp_path / "llm", released.llm, released.projector, released.tower_dir, state=state)
    with pytest.raises(
        CheckpointError, match=r"(?s)language model .*pytorch_model-0000\d-of-00002.bin.*model.norm.weight"
    ):
        from_llava_checkpoint(llm_dir)


def test_anything_left_on_meta_is_named(released):
    model = weights.empty_model(from_llava_checkpoint(released.llm_dir)[0].config, torch.float32)
    with pytest.raises(CheckpointError, match=r"parameters or buffers were not loaded \(e.g. \['vision_tower"):
        weights.finish_loading(model)


# A child process: its memory is its own. Per load, VmHWM is reset first (clear_refs 5), so its peak counts only what
# the load adds: the weights, each touched once so that memory-mapped pages count as resident.
MEASURE = """
import gc, json, sys, torch
from pathlib import Path
from convllava.modeling.checkpoint import load_model
from convllava.modeling.llava_checkpoint import from_llava_checkpoint

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

for kind, directory in zip(sys.argv[1::2], sys.argv[2::2]):
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    model = from_llava_checkpoint(directory, dtype=torch.float16)[0] if kind == "llava" else load_model(directory)[0]
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with torch.no_grad():  # every page of every weight read once, with no float32 temporaries
        touched = sum(float(p.sum()) for p in model.parameters())
    extra = status("VmHWM") - base
    print(json.dumps({"kind": kind, "extra_peak": extra, "bytes": sum(p.nbytes for p in model.parameters())}))
    del model
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_is_one_copy_of_the_weights(released, tmp_path):
    """~80 MB of float16 weights in four shards: loading (both released layout and our format) adds at most 1.5× the
    checkpoint's bytes at its peak; the old loader (a float32 model, all shards merged, then a float16 copy) took
    over 3× (bench/checkpoint_load.py)."""
    config = dict(LLM, vocab_size=16000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8)
    with torch.device("meta"):  # shapes and config.json fields only
        llm = LlamaForCausalLM(LlamaConfig(**config))
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float16) for k, v in llm.state_dict().items()}
    projector = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 512)).half()
    llm_dir = write_llava_llm(tmp_path / "llm", llm, projector, released.tower_dir, state=state)
    load_tokenizer("tiny").save_pretrained(llm_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--llava", str(llm_dir), "--output", str(tmp_path / "ours")])
    assert exit_info.value.code == 0
    stored = sum(f.stat().st_size for f in llm_dir.glob("*.bin"))
    args = ["llava", str(llm_dir), "ours", str(tmp_path / "ours")]
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["kind"] for r in results] == ["llava", "ours"]
    for result in results:
        assert result["bytes"] > 0.95 * stored
        assert result["extra_peak"] <= 1.5 * stored, (result["kind"], result["extra_peak"] / stored)


@pytest.mark.parametrize(
    "flag, want",
    [(None, torch.float16), ("float16", torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)],
)
def test_convert_cli_writes_our_format_with_identical_logits(released, tmp_path, input_ids, pixels, flag, want):
    """--dtype defaults to the dtype config.json says the weights are stored in (float16, as released)."""
    out = tmp_path / "converted"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--llava", str(released.llm_dir), "--output", str(out)] + (["--dtype", flag] * bool(flag)))
    assert exit_info.value.code == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {want}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    converted, processor = load_model(out)
    original, _ = from_llava_checkpoint(released.llm_dir, dtype=want)
    assert converted.dtype == original.dtype == want
    assert processor.image_token_id == 4 and processor.config.image.resolution == 256
    assert torch.equal(logits_of(converted, input_ids, pixels), logits_of(original, input_ids, pixels))


def test_convert_cli_refuses_to_write_over_its_source(released, capsys):
    """The loaded weights may be the source files' memory-mapped pages."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--llava", str(released.llm_dir), "--output", str(released.llm_dir)])
    assert exit_info.value.code == 2
    assert f"--output {released.llm_dir} is the --llava directory" in capsys.readouterr().err

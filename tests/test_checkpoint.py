"""Checkpoints: the HF ConvNext → timm key map, released LLaVA-layout checkpoints (local, s3://, `convllava convert`)
and our own format. Released checkpoints are faked with tiny random models in exactly the released layout, and
every load is checked against a forward pass through the reference modules themselves."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import ConvNextConfig, ConvNextModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from convllava import checkpoint
from convllava.checkpoint import CheckpointError, from_llava_checkpoint, load_model, save_checkpoint
from convllava.image_processing import load_image
from convllava.modeling import ConvLlavaForCausalLM
from convllava.storage import upload_dir
from convllava.tokenizer import load_tokenizer
from convllava.vision import ConvNeXtTower, checkpoint_filter_fn
from jobs import cli

TOWER = dict(depths=[1, 1, 2, 1, 1], hidden_sizes=[16, 32, 64, 96, 128])
LLM = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
QUESTION = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of unit scale everywhere (incl. layer scales and norms), so a mis-mapped key shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 1.0))
    return module.eval()


def hf_convnext(depths=TOWER["depths"], hidden_sizes=TOWER["hidden_sizes"], seed: int = 0) -> ConvNextModel:
    config = ConvNextConfig(num_stages=len(depths), depths=depths, hidden_sizes=hidden_sizes, image_size=256)
    return randomize_(ConvNextModel(config), seed)


def write_tower(tower: ConvNextModel, directory: Path) -> Path:
    """A released-style tower: config.json + pytorch_model.bin. (transformers 5 ignores
    `save_pretrained(safe_serialization=False)` and writes safetensors, so the .bin is written directly.)"""
    tower.config.save_pretrained(directory)
    torch.save(tower.state_dict(), directory / "pytorch_model.bin")
    return directory


def write_llava_llm(
    directory: Path, llm: LlamaForCausalLM, projector: nn.Sequential, tower_dir: Path, state: dict | None = None
) -> Path:
    """A released-style LLM dir: LLaVA config.json and LLM + `model.mm_projector.*` weights in two .bin shards."""
    directory.mkdir(parents=True)
    state = dict(llm.state_dict() if state is None else state)
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = llm.config.to_dict() | {
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "torch_dtype": "float16",  # what the released config.json files say
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": 128,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -1,
        "mm_use_im_start_end": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


class Released:
    """A fake released checkpoint on disk plus the reference modules it was written from."""

    def __init__(self, root: Path) -> None:
        self.tower = hf_convnext()
        self.llm = randomize_(LlamaForCausalLM(LlamaConfig(**LLM, attn_implementation="eager")), seed=1)
        self.projector = randomize_(nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64)), seed=2)
        self.tower_dir = write_tower(self.tower, root / "tower")
        self.llm_dir = write_llava_llm(root / "llm", self.llm, self.projector, self.tower_dir)
        load_tokenizer("tiny").save_pretrained(self.llm_dir)

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
        return reference_logits(self.tower, self.projector, self.llm, input_ids, pixel_values, image_token_id)


@torch.no_grad()
def reference_logits(
    tower: ConvNextModel,
    projector: nn.Module,
    llm: LlamaForCausalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """HF tower → projector → scattered into the LM's embeddings at the placeholders → LM logits."""
    features = tower(pixel_values).last_hidden_state.flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h·w, C)
    features = projector(features).flatten(0, 1)  # (B·h·w, D)
    mask = input_ids == image_token_id
    embeds = llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))  # (B, T, D)
    embeds[mask] = features
    return llm(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Released:
    return Released(tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def input_ids(released) -> torch.Tensor:
    processor = from_llava_checkpoint(released.llm_dir)[1]
    sample = processor.tokenize(QUESTION, [(256, 256)], add_generation_prompt=True, check=False)
    return torch.tensor([sample.input_ids])


@torch.no_grad()
def logits_of(model: ConvLlavaForCausalLM, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, pixel_values=pixels).logits


def llm_copy(released: Released, tmp_path: Path) -> Path:
    return Path(shutil.copytree(released.llm_dir, tmp_path / "llm"))


# --------------------------------------------------------------------------- HF ConvNext → timm


def test_checkpoint_filter_fn_maps_every_hf_key_and_matches_hf_features():
    hf = hf_convnext()
    tower = ConvNeXtTower(depths=(1, 1, 2, 1), dims=(16, 32, 64, 96), stage5_depth=1, stage5_dim=128).eval()
    mapped = checkpoint_filter_fn(hf.state_dict())
    assert not any(k.startswith("layernorm.") for k in mapped)  # the pooled-output norm is dropped
    assert len(mapped) == len(hf.state_dict()) - 2
    tower.model.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 128, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(x).last_hidden_state  # (2, 128, 2, 5)
        got = tower(x)
    assert got.shape == (2, 10, 128)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # The LLaVA prefix is stripped too.
    prefixed = checkpoint_filter_fn({f"model.vision_tower.vision_tower.{k}": v for k, v in hf.state_dict().items()})
    assert prefixed.keys() == mapped.keys()


def test_checkpoint_filter_fn_names_an_unknown_key():
    with pytest.raises(KeyError, match="encoder.stages.0.mystery.weight"):
        checkpoint_filter_fn({"encoder.stages.0.mystery.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- released LLaVA layout


def test_from_llava_checkpoint_matches_reference_forward(released, input_ids, pixels):
    model, processor = from_llava_checkpoint(released.llm_dir)
    assert processor.image_token_id == model.config.image_token_id == 4
    assert int((input_ids == 4).sum()) == 16  # 256×256 → (256/64)² placeholders
    assert model.config.image_resolution == 256 and model.config.image_mode == "square"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    want = released.logits(input_ids, pixels, image_token_id=4)
    torch.testing.assert_close(logits_of(model, input_ids, pixels), want, atol=1e-4, rtol=1e-4)
    via_class = ConvLlavaForCausalLM.from_llava_checkpoint(released.llm_dir)
    assert torch.equal(logits_of(via_class, input_ids, pixels), logits_of(model, input_ids, pixels))


def test_without_tokenizer_placeholders_lie_outside_the_vocabulary(released, tmp_path, input_ids, pixels):
    llm_dir = llm_copy(released, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llm_dir / name).unlink()
    model, processor = from_llava_checkpoint(llm_dir)
    assert processor is None
    assert model.config.image_token_id == LLM["vocab_size"] == model.get_input_embeddings().num_embeddings
    ids = input_ids.masked_fill(input_ids == 4, LLM["vocab_size"])
    want = released.logits(ids, pixels, image_token_id=LLM["vocab_size"])
    torch.testing.assert_close(logits_of(model, ids, pixels), want, atol=1e-4, rtol=1e-4)


def test_tied_lm_head_stored_once_loads(released, tmp_path, input_ids, pixels):
    """save_pretrained writes a tied lm_head.weight only once, as embed_tokens.weight (LMs with tied embeddings)."""
    llm = randomize_(LlamaForCausalLM(LlamaConfig(**LLM, tie_word_embeddings=True, attn_implementation="eager")), 4)
    assert llm.lm_head.weight is llm.get_input_embeddings().weight
    stored = {k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    llm_dir = write_llava_llm(tmp_path / "llm", llm, released.projector, released.tower_dir, state=stored)
    load_tokenizer("tiny").save_pretrained(llm_dir)
    model, _ = from_llava_checkpoint(llm_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    want = reference_logits(released.tower, released.projector, llm, input_ids, pixels, image_token_id=4)
    torch.testing.assert_close(logits_of(model, input_ids, pixels), want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- one copy of the weights


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
    read = checkpoint._load_file

    def spy(path):
        assert not [ref for ref in alive if ref() is not None], f"a tensor of an earlier shard is alive at {path.name}"
        calls.append(path.name)
        shard = read(path)
        alive.extend(weakref.ref(t) for t in shard.values())
        return shard

    def merged(directory):
        raise AssertionError(f"load_state_dict({directory}) merges every shard")

    monkeypatch.setattr(checkpoint, "_load_file", spy)
    monkeypatch.setattr(checkpoint, "load_state_dict", merged)
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
    model = checkpoint._empty_model(from_llava_checkpoint(released.llm_dir)[0].config, torch.float32)
    with pytest.raises(CheckpointError, match=r"parameters or buffers were not loaded \(e.g. \['vision_tower"):
        checkpoint._finish_loading(model)


# A child process: its memory is its own. Per load, VmHWM is reset first (clear_refs 5), so its peak counts only what
# the load adds: the weights, each touched once so that memory-mapped pages count as resident.
MEASURE = """
import gc, json, sys, torch
from pathlib import Path
from convllava.checkpoint import from_llava_checkpoint, load_model

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


# --------------------------------------------------------------------------- errors a user can act on


def test_missing_mm_hidden_size_names_field_and_file(released, tmp_path):
    llm_dir = llm_copy(released, tmp_path)
    config = json.loads((llm_dir / "config.json").read_text())
    del config["mm_hidden_size"]
    (llm_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mm_hidden_size") as e:
        from_llava_checkpoint(llm_dir)
    assert str(llm_dir / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "key, value", [("mm_vision_select_layer", -2), ("mm_use_im_start_end", True), ("mm_patch_merge_type", "spatial")]
)
def test_llava_options_this_loader_cannot_reproduce_are_refused(released, tmp_path, key, value):
    llm_dir = llm_copy(released, tmp_path)
    config = json.loads((llm_dir / "config.json").read_text())
    (llm_dir / "config.json").write_text(json.dumps(config | {key: value}))
    with pytest.raises(CheckpointError, match=f"config.json: {key}={value!r} is not supported"):
        from_llava_checkpoint(llm_dir)


def test_four_stage_tower_is_refused(released, tmp_path):
    tower_dir = write_tower(hf_convnext(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128]), tmp_path / "tower4")
    with pytest.raises(CheckpointError, match="5 stages"):
        from_llava_checkpoint(released.llm_dir, vision_tower=tower_dir)


def test_missing_tower_directory_asks_for_vision_tower(released, tmp_path):
    with pytest.raises(CheckpointError, match="--vision-tower"):
        from_llava_checkpoint(released.llm_dir, vision_tower=tmp_path / "nowhere")
    llm_dir = llm_copy(released, tmp_path)  # config.json's mm_vision_tower is a hub name, not a directory
    config = json.loads((llm_dir / "config.json").read_text())
    (llm_dir / "config.json").write_text(json.dumps(config | {"mm_vision_tower": "ConvLLaVA/ConvLLaVA-ConvNeXt-1536"}))
    with pytest.raises(CheckpointError, match="ConvLLaVA-ConvNeXt-1536.*--vision-tower"):
        from_llava_checkpoint(llm_dir)


def test_missing_shard_is_named(released, tmp_path):
    llm_dir = llm_copy(released, tmp_path)
    (llm_dir / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        from_llava_checkpoint(llm_dir)


def test_load_model_reads_the_llava_layout_as_from_llava_checkpoint_does(released, input_ids, pixels):
    model, processor = load_model(released.llm_dir)
    assert processor.config.tokenization == "llava"
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # "auto": config.json's torch_dtype
    want = logits_of(from_llava_checkpoint(released.llm_dir, dtype=torch.float16)[0], input_ids, pixels)
    assert torch.equal(logits_of(model, input_ids, pixels), want)


# --------------------------------------------------------------------------- s3:// and our format


def test_s3_llava_layout_and_our_format(released, s3_bucket, tmp_path, input_ids, pixels):
    local, processor = from_llava_checkpoint(released.llm_dir)
    want = logits_of(local, input_ids, pixels)
    assert upload_dir(released.llm_dir, f"s3://{s3_bucket}/llm") == len(list(released.llm_dir.iterdir()))
    upload_dir(released.tower_dir, f"s3://{s3_bucket}/tower")
    remote, remote_processor = from_llava_checkpoint(f"s3://{s3_bucket}/llm", vision_tower=f"s3://{s3_bucket}/tower")
    assert remote_processor.image_token_id == 4
    assert torch.equal(logits_of(remote, input_ids, pixels), want)

    upload_dir(save_checkpoint(local, processor, tmp_path / "ours"), f"s3://{s3_bucket}/ours")
    loaded, loaded_processor = load_model(f"s3://{s3_bucket}/ours")
    assert loaded_processor.image_token_id == 4
    assert torch.equal(logits_of(loaded, input_ids, pixels), want)


def test_save_then_load_round_trip(tiny_model, tiny_processor, photos, tmp_path):
    conversation = [QUESTION[0], {"role": "assistant", "content": "A cat."}]
    batch = tiny_processor([conversation], [load_image(photos[1].path)])
    assert batch["pixel_values"].shape[-2:] != (256, 256)  # a non-square bucket
    with torch.no_grad():
        want = tiny_model(**batch).logits
    save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    # The attention backend is a runtime choice that transformers does not store; ask for the one used above.
    loaded, processor = load_model(tmp_path / "ckpt", attn_implementation="eager")
    assert sorted(loaded.state_dict()) == sorted(tiny_model.state_dict())
    with torch.no_grad():
        got = loaded(**processor([conversation], [load_image(photos[1].path)])).logits
    assert torch.equal(got, want)

"""Checkpoints: the HF ConvNext → timm key map, released LLaVA-layout checkpoints (local, s3://, `convllava convert`)
and our own format. Released checkpoints are faked with tiny random models in exactly the released layout, and
every load is checked against a forward pass through the reference modules themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextModel, LlamaConfig, LlamaForCausalLM

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


def test_convert_cli_writes_our_format_with_identical_logits(released, tmp_path, input_ids, pixels):
    out = tmp_path / "converted"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "--llava", str(released.llm_dir), "--output", str(out)])
    assert exit_info.value.code == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    converted, processor = load_model(out)
    original, _ = from_llava_checkpoint(released.llm_dir)
    assert processor.image_token_id == 4 and processor.config.image.resolution == 256
    assert torch.equal(logits_of(converted, input_ids, pixels), logits_of(original, input_ids, pixels))


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


def test_load_model_on_llava_layout_says_convert(released):
    with pytest.raises(CheckpointError, match="convllava convert"):
        load_model(released.llm_dir)


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

"""Released LLaVA-layout checkpoints: the HF ConvNext → timm key map, loads checked against a forward pass through
the reference modules themselves, and errors a user can act on."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_harness import (
    LLM,
    hf_convnext,
    llm_copy,
    logits_of,
    randomize_,
    reference_logits,
    write_llava_llm,
    write_tower,
)
from transformers import LlamaConfig, LlamaForCausalLM

from convllava.modeling.checkpoint import load_model
from convllava.modeling.llava_checkpoint import from_llava_checkpoint
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.modeling.vision import ConvNeXtTower, checkpoint_filter_fn
from convllava.modeling.weights import CheckpointError
from convllava.processing.tokenizer import load_tokenizer

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

"""Checkpoints on s3:// (released layout and our format) and our format's save → load round trip."""

from __future__ import annotations

import torch
from checkpoint_harness import QUESTION, logits_of

from convllava.io.storage import upload_dir
from convllava.modeling.checkpoint import load_model, save_checkpoint
from convllava.modeling.llava_checkpoint import from_llava_checkpoint
from convllava.processing.image_processing import load_image


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
    batch = tiny_processor(conversations=[conversation], images=[load_image(photos[1].path)])
    assert batch["pixel_values"].shape[-2:] != (256, 256)  # a non-square bucket
    with torch.no_grad():
        want = tiny_model(**batch).logits
    save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    # The attention backend is a runtime choice that transformers does not store; ask for the one used above.
    loaded, processor = load_model(tmp_path / "ckpt", attn_implementation="eager")
    assert sorted(loaded.state_dict()) == sorted(tiny_model.state_dict())
    with torch.no_grad():
        got = loaded(**processor(conversations=[conversation], images=[load_image(photos[1].path)])).logits
    assert torch.equal(got, want)

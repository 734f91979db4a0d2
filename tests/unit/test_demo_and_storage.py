"""The main job (`make demo`) and s3:// loading against a real HTTP S3 endpoint."""

import pytest
import torch

from convllava.io.storage import download_prefix, upload_dir
from convllava.modeling.checkpoint import load_model, save_checkpoint
from convllava.processing.tokenizer import load_tokenizer


def test_tokenizer_and_model_load_from_s3(s3_bucket, tmp_path, tiny_model, tiny_processor):
    tiny_processor.tokenizer.save_pretrained(tmp_path / "tok")
    assert upload_dir(tmp_path / "tok", f"s3://{s3_bucket}/tokenizers/tiny") >= 2
    tok = load_tokenizer(f"s3://{s3_bucket}/tokenizers/tiny")
    assert tok("a red circle").input_ids == tiny_processor.tokenizer("a red circle").input_ids

    save_checkpoint(tiny_model, tiny_processor, tmp_path / "ckpt")
    upload_dir(tmp_path / "ckpt", f"s3://{s3_bucket}/models/tiny")
    model, processor = load_model(f"s3://{s3_bucket}/models/tiny", attn_implementation="eager")
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_missing_s3_prefix_is_a_clear_error(s3_bucket):
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{s3_bucket}/absent"):
        download_prefix(f"s3://{s3_bucket}/absent")

"""Helpers shared by the plan's unit and integration tests: a mid-size model and the plan CLI."""

from __future__ import annotations

import pytest

from convllava.modeling.config import ConvLlavaConfig

# A mid-size ConvLLaVA: a 6-layer, 768-wide LM with Vicuna's 32000-token vocabulary and a small five-stage tower,
# about 100M parameters (400 MB in fp32).
MID_TEXT = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def mid_config(**overrides) -> ConvLlavaConfig:
    return ConvLlavaConfig.from_preset(
        "tiny",
        text_config=MID_TEXT,
        image_token_id=4,  # the tiny tokenizer's <image>
        vision_dims=(64, 128, 256, 512),
        vision_depths=(1, 1, 3, 1),
        vision_stage5_dim=768,
        **overrides,
    )


def plan_cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    from jobs.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as info:
        main(["plan", *args])
    return info.value.code, buf.getvalue()

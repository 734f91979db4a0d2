"""A checkpoint in the released layout with a Vicuna-style sentencepiece tokenizer, used as a new user would:
`convllava chat` and `convllava eval` straight on the LLaVA-layout directory. The chat reply is checked against a
greedy decode through the reference modules (HF ConvNext tower, projector, HF Llama) on the sequence LLaVA's
`tokenizer_image_token` builds (computed with sentencepiece alone) and the pixels LLaVA's `pad` preprocessing gives."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from convllava.modeling.checkpoint import load_model
from convllava.processing.buckets import num_visual_tokens
from convllava.processing.templates import VICUNA_SYSTEM
from jobs import cli
from unit.test_image_processing import llava_pad_reference
from unit.test_processor import IMAGE_INDEX, expand_images, tokenizer_image_token

RESOLUTION = 256  # the tower config's image_size
QUESTION = "What is in the picture?"


def test_load_model_reads_the_released_layout_with_llava_tokenization(released_spm):
    model, processor = load_model(released_spm.llm_dir)
    assert processor.config.tokenization == "llava"
    assert processor.tokenizer.is_fast and processor.image_token_id == released_spm.image_token_id
    assert processor.config.image.mode == "square" and processor.config.image.resolution == RESOLUTION
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # config.json's torch_dtype ("auto")


def test_chat_cli_answers_as_the_reference_modules_do(released_spm, llama_reference, photos, capsys):
    photo = photos[0]
    max_new = 6
    cli_args = [
        "chat",
        "--model",
        str(released_spm.llm_dir),
        "--image",
        str(photo.path),
        "--max-new-tokens",
        str(max_new),
        QUESTION,
    ]
    with pytest.raises(SystemExit) as done:
        cli.main(cli_args)
    assert done.value.code == 0
    reply = capsys.readouterr().out.strip()

    # The released models' inputs, computed without our code: LLaVA's prompt for a first turn with an image,
    # tokenizer_image_token over sentencepiece, and LLaVA's pad preprocessing through CLIPImageProcessorPil.
    prompt = f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    ids = tokenizer_image_token(prompt, llama_reference.encode)
    assert llama_reference.sp.id_to_piece(ids[ids.index(IMAGE_INDEX) + 1]) == "▁"  # the dummy prefix after the image
    ids = expand_images(ids, released_spm.image_token_id, [num_visual_tokens(RESOLUTION, RESOLUTION)])
    pixels = llava_pad_reference(Image.open(photo.path).convert("RGB"), RESOLUTION)[None]
    new = released_spm.greedy(ids, pixels, max_new, eos=llama_reference.sp.eos_id())
    assert new, "the reference decode produced no token; pick another seed"
    assert reply == llama_reference.sp.decode(new).strip()

    # The same through the library: the prompt our processor builds is exactly that sequence.
    _, processor = load_model(released_spm.llm_dir)
    sample = processor.tokenize(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}],
        [(RESOLUTION, RESOLUTION)],
        add_generation_prompt=True,
        check=False,
    )
    assert sample.input_ids == ids

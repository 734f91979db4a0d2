"""Generation helpers shared by `convllava chat`, batch prediction and evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.processor import ConvLlavaProcessor


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    do_sample: bool = False  # greedy by default: reproducible answers for evaluation
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def _generate_ids(
    model: ConvLlavaForCausalLM, processor: ConvLlavaProcessor, batch: dict, options: GenerationOptions
) -> list[list[int]]:
    device = model.device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    pixel_values = batch.get("pixel_values")
    if isinstance(pixel_values, list):
        inputs["pixel_values"] = [x.to(device) for x in pixel_values]
    sampling = dict(temperature=options.temperature, top_p=options.top_p) if options.do_sample else {}
    vocab = model.get_output_embeddings().out_features
    suppress = [processor.image_token_id] if processor.image_token_id < vocab else None
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            num_beams=options.num_beams,
            eos_token_id=processor.stop_token_ids(),
            pad_token_id=processor.tokenizer.pad_token_id,
            suppress_tokens=suppress,
            **sampling,
        )
    prompt_len = batch["input_ids"].shape[1]
    return out[:, prompt_len:].tolist()


def generate(
    model: ConvLlavaForCausalLM,
    processor: ConvLlavaProcessor,
    questions: Sequence[str],
    images: Sequence[Image.Image | None] | None = None,
    options: GenerationOptions | None = None,
    system: str | None = None,
) -> list[str]:
    """Answer a batch of single-turn questions, each about at most one image (None for text-only)."""
    images = list(images) if images is not None else [None] * len(questions)
    batch = processor.prompts(questions, images, system=system)
    return [processor.decode(ids) for ids in _generate_ids(model, processor, batch, options or GenerationOptions())]


def chat_reply(
    model: ConvLlavaForCausalLM,
    processor: ConvLlavaProcessor,
    messages: list[dict[str, str]],
    image: Image.Image | None = None,
    options: GenerationOptions | None = None,
) -> str:
    """The assistant's next reply to a multi-turn conversation (the image belongs to the first user turn)."""
    batch = processor.generation_batch([(messages, image)], sample_ids=["chat"])
    return processor.decode(_generate_ids(model, processor, batch, options or GenerationOptions())[0])

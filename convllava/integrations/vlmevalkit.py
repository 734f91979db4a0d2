"""ConvLLaVA as a VLMEvalKit model.

    from convllava.integrations.vlmevalkit import ConvLlavaVLMEvalKit

    model = ConvLlavaVLMEvalKit("CKPT")
    model.generate([{"type": "image", "value": "cat.jpg"}, {"type": "text", "value": "What is this?"}])

With VLMEvalKit's runner, add the model to its table before running (VLMEvalKit has no plugin mechanism):
`vlmeval.config.supported_VLM["convllava"] = functools.partial(ConvLlavaVLMEvalKit, model_path="CKPT")`.

VLMEvalKit is not published on PyPI (it is installed from its git repository). When `vlmeval` is importable the
class subclasses `vlmeval.vlm.base.BaseModel`; otherwise `LocalBaseModel` below, which keeps the same contract:
`generate(message, dataset=None)` checks the message and calls `generate_inner`, and `use_custom_prompt` /
`build_prompt` say "use the dataset's prompt".

Messages are lists of `{"type": "image" | "text", "value": ...}` in reading order. Each image becomes an `<image>`
tag at its place; the items are joined with newlines, so `[image, text]` gives `"<image>\\n" + text`, the prompt
`convllava.modeling.inference.generate` builds for one image, and both answer alike (greedy). Several images are accepted,
each at its tag (`INTERLEAVE = True`); ConvLLaVA was trained on one image per conversation, so answers about
several images are outside what it learned.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

from convllava.integrations import as_image, generate_interleaved, load_for_eval
from convllava.modeling.inference import GenerationOptions
from convllava.processing.templates import IMAGE_TOKEN

MESSAGE_TYPES = ("text", "image")


class LocalBaseModel:
    """The part of VLMEvalKit's `BaseModel` contract that its runner relies on, for when vlmeval is not installed."""

    INTERLEAVE = False
    allowed_types = list(MESSAGE_TYPES)

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False

    def build_prompt(self, line: Any, dataset: str | None = None) -> list[dict] | None:
        return None

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        raise NotImplementedError

    def generate(self, message: str | dict | list, dataset: str | None = None) -> str:
        """A bare string is one text item and a dict one item; a list of dicts goes to `generate_inner` as it is.

        (VLMEvalKit's own `generate` also takes a list of strings, guessing which are image paths; this stand-in
        does not guess.)
        """
        if isinstance(message, str):
            message = [{"type": "text", "value": message}]
        elif isinstance(message, dict):
            message = [message]
        return self.generate_inner(message, dataset)


try:
    from vlmeval.vlm.base import BaseModel as _Base
except ImportError:  # VLMEvalKit is not installed: keep the same contract locally
    _Base = LocalBaseModel


class ConvLlavaVLMEvalKit(_Base):
    """A ConvLLaVA checkpoint (our format, local or `s3://`) behind VLMEvalKit's model interface.

    Args:
        model_path: the checkpoint directory.
        device: "cuda", "cuda:1", "cpu"; default: cuda when available.
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        max_new_tokens, do_sample, temperature, top_p, num_beams: see `GenerationOptions` (default: greedy).
        system: system prompt; default: the conversation template's.
        attn_implementation: "sdpa", "eager", "flash_attention_2"; default: the checkpoint's.
    """

    INTERLEAVE = True
    allowed_types = list(MESSAGE_TYPES)

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        system: str | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        self.model, self.processor = load_for_eval(model_path, device, dtype, attn_implementation)
        self.options = GenerationOptions(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            num_beams=num_beams,
        )
        self.system = system

    def use_custom_prompt(self, dataset: str | None) -> bool:
        """False: every dataset's own `build_prompt` makes the message."""
        return False

    def build_prompt(self, line: Any, dataset: str | None = None) -> list[dict] | None:
        """Not used (`use_custom_prompt` is False for every dataset)."""
        return None

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        """The model's answer to one interleaved message; `dataset` does not change how it answers.

        Raises:
            ValueError: an empty message, an item that is not {"type", "value"}, an unknown type, a text item that
                holds an `<image>` tag itself, or an image given as a URL; the message names the item.
            ImageError: an image file that is missing or cannot be decoded (named).
        """
        text, images = message_to_prompt(message)
        return generate_interleaved(self.model, self.processor, [(text, images)], self.options, system=self.system)[0]


def message_to_prompt(message: list[dict]) -> tuple[str, list[Image.Image]]:
    """A VLMEvalKit message → (prompt text with one `<image>` tag per image, the images in order).

    Raises:
        ValueError, ImageError: see `ConvLlavaVLMEvalKit.generate_inner`.
    """
    if not isinstance(message, list) or not message:
        raise ValueError(f"message: expected a non-empty list of {{'type', 'value'}} dicts, got {message!r:.80}")
    parts: list[str] = []
    images: list[Image.Image] = []
    for i, item in enumerate(message):
        if not isinstance(item, dict) or not {"type", "value"} <= item.keys():
            raise ValueError(f"message item {i}: expected a dict with 'type' and 'value', got {item!r:.80}")
        kind, value = item["type"], item["value"]
        if kind == "text":
            if not isinstance(value, str):
                raise ValueError(f"message item {i}: a text value must be a string, got {type(value).__name__}")
            if IMAGE_TOKEN in value:
                raise ValueError(
                    f"message item {i}: the text holds {IMAGE_TOKEN!r}; pass images as {{'type': 'image'}} items"
                )
            parts.append(value)
        elif kind == "image":
            try:
                images.append(as_image(value))
            except ValueError as e:  # ImageError is a ValueError: name the item
                raise type(e)(f"message item {i}: {e}") from e
            parts.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"message item {i}: unknown type {kind!r}; expected one of {list(MESSAGE_TYPES)}")
    return "\n".join(parts), images

"""ConvLlavaProcessor: conversations + images → input_ids, labels, pixel_values.

Tokenization renders the whole conversation with its template, tokenizes it with character offsets and labels
exactly the tokens that lie inside assistant replies. Each `<image>` token is then expanded into the image's
(H/64)·(W/64) placeholders. A preflight check refuses samples that would silently train on nothing (all labels
masked) or whose token boundaries cut across the template's reply boundaries.

Two tokenizations of the rendered text:
- `one_pass` (our models): the whole text at once, `<image>` a special token of the tokenizer.
- `llava` (the released LLaVA-trained checkpoints): LLaVA's `tokenizer_image_token`. The text is split at each
  `<image>`, every chunk is tokenized on its own (with a Llama tokenizer: BOS and the dummy prefix `▁`), the BOS of
  all chunks but the first is dropped and the image index goes between chunks, so a `▁` follows every image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from convllava.buckets import num_visual_tokens
from convllava.image_processing import ConvLlavaImageProcessor, ImageProcessorConfig
from convllava.templates import IMAGE_TOKEN, ConversationError, ConversationTemplate, get_template
from convllava.tokenizer import encode_with_offsets, ensure_special_tokens, load_tokenizer

IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"
Truncation = Literal["truncate", "error"]
Tokenization = Literal["one_pass", "llava"]
TOKENIZATIONS: tuple[str, ...] = get_args(Tokenization)


class SequenceTooLongError(ValueError):
    """A sample longer than max_length under the `error` policy, or one whose image would be cut."""


class PreflightError(ValueError):
    """A sample that would train on nothing or whose labels disagree with its template."""


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    num_image_tokens: int
    truncated: bool = False
    sample_id: str = "?"
    # (token index, token text) pairs whose character span crosses a reply boundary.
    boundary_conflicts: list[tuple[int, str]] = field(default_factory=list)
    # The learned text the template rendered (for the decode check).
    learned_text: str = ""

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class ProcessorConfig:
    """Args:
    template: conversation template (`convllava.templates.TEMPLATES`).
    max_length: maximum tokens per sample, visual tokens included.
    truncation: `truncate` (never through an image) or `error`.
    tokenization: `one_pass` (our models) or `llava` (LLaVA's `tokenizer_image_token`, for released checkpoints).
    image: how images become pixel tensors.
    """

    template: str = "vicuna_v1"
    max_length: int = 2048
    truncation: Truncation = "truncate"
    tokenization: Tokenization = "one_pass"
    image: ImageProcessorConfig = ImageProcessorConfig()

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"truncation: expected 'truncate' or 'error', got {self.truncation!r}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization: expected one of {TOKENIZATIONS}, got {self.tokenization!r}")


class ConvLlavaProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ProcessorConfig | None = None) -> None:
        self.tokenizer = ensure_special_tokens(tokenizer)
        self.config = config or ProcessorConfig()
        self.template: ConversationTemplate = get_template(self.config.template)
        self.image_processor = ConvLlavaImageProcessor(self.config.image)
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def for_model(cls, model_config, tokenizer: PreTrainedTokenizerBase | str, **overrides) -> ConvLlavaProcessor:
        """A processor with the model's template, resolution and image mode; `overrides` may change those and set any
        other `ProcessorConfig` field (e.g. `tokenization="llava"` for a released LLaVA-trained checkpoint)."""
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        image_kwargs = {"resolution": model_config.image_resolution, "mode": model_config.image_mode}
        image_kwargs.update({k: overrides.pop(k) for k in ("resolution", "mode") if k in overrides})
        overrides = {"template": model_config.template, **overrides}
        config = ProcessorConfig(image=ImageProcessorConfig(**image_kwargs), **overrides)
        processor = cls(tokenizer, config)
        if processor.image_token_id != model_config.image_token_id:
            raise ValueError(
                f"tokenizer maps {IMAGE_TOKEN} to id {processor.image_token_id} but the model config says "
                f"image_token_id={model_config.image_token_id}"
            )
        return processor

    # ------------------------------------------------------------------ text
    def tokenize(
        self,
        messages: list[dict[str, str]],
        image_sizes: Sequence[tuple[int, int]] = (),
        sample_id: str = "?",
        add_generation_prompt: bool = False,
        check: bool = True,
    ) -> TokenizedSample:
        """Tokenize one conversation.

        Args:
            messages: LLaVA (`from`/`value`) or chat (`role`/`content`) turns.
            image_sizes: (H, W) of each processed image, in the order of the `<image>` tags.
            sample_id: named in every error.
            add_generation_prompt: end with the assistant prefix (inference).
            check: run `preflight` (training data) and raise on failure.

        Raises:
            ConversationError: malformed turns, or `<image>` tags that do not match the images one to one.
            SequenceTooLongError: over max_length under the `error` policy, or truncation would cut an image.
            PreflightError: see `preflight`.
        """
        segments = self.template.render(messages, add_generation_prompt=add_generation_prompt, sample_id=sample_id)
        text = "".join(t for t, _ in segments)
        n_tags = text.count(IMAGE_TOKEN)
        if n_tags != len(image_sizes):
            raise ConversationError(
                f"sample {sample_id}: {n_tags} {IMAGE_TOKEN} tag(s) in the conversation but {len(image_sizes)} "
                "image(s); each image needs exactly one tag"
            )
        spans, pos = [], 0
        for t, learned in segments:
            if learned:
                spans.append((pos, pos + len(t)))
            pos += len(t)

        if self.config.tokenization == "llava":
            ids, offsets = self._encode_llava(text)
        else:
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels: list[int] = []
        conflicts: list[tuple[int, str]] = []
        # Tokens with empty spans (BOS, a dummy-prefix `▁`) are never labelled.
        for i, (token_id, (start, end)) in enumerate(zip(ids, offsets, strict=True)):
            inside = start < end and any(a <= start and end <= b for a, b in spans)
            crosses = start < end and not inside and any(start < b and a < end for a, b in spans)
            if crosses:
                conflicts.append((i, text[start:end]))
            labels.append(token_id if inside else IGNORE_INDEX)

        if ids.count(self.image_token_id) != n_tags:
            raise ConversationError(
                f"sample {sample_id}: the tokenizer split {IMAGE_TOKEN} ({ids.count(self.image_token_id)} tokens "
                f"for {n_tags} tags); it must be a single special token"
            )
        input_ids, out_labels, sizes = [], [], iter(image_sizes)
        for token_id, label in zip(ids, labels, strict=True):
            if token_id == self.image_token_id:
                n = num_visual_tokens(*next(sizes))
                input_ids.extend([self.image_token_id] * n)
                out_labels.extend([IGNORE_INDEX] * n)
            else:
                input_ids.append(token_id)
                out_labels.append(label)
        n_image_tokens = input_ids.count(self.image_token_id)

        truncated = False
        if len(input_ids) > self.config.max_length:
            if self.config.truncation == "error":
                raise SequenceTooLongError(
                    f"sample {sample_id}: {len(input_ids)} tokens exceed max_length {self.config.max_length} "
                    "(truncation policy: error)"
                )
            if input_ids[: self.config.max_length].count(self.image_token_id) != n_image_tokens:
                raise SequenceTooLongError(
                    f"sample {sample_id}: truncating {len(input_ids)} tokens to max_length "
                    f"{self.config.max_length} would cut an image's {n_image_tokens} visual tokens"
                )
            input_ids, out_labels, truncated = (
                input_ids[: self.config.max_length],
                out_labels[: self.config.max_length],
                True,
            )

        sample = TokenizedSample(
            input_ids=input_ids,
            labels=out_labels,
            num_image_tokens=n_image_tokens,
            truncated=truncated,
            sample_id=sample_id,
            boundary_conflicts=conflicts,
            learned_text="".join(text[a:b] for a, b in spans),
        )
        if check and not add_generation_prompt:
            self.preflight(sample)
        return sample

    def _encode_llava(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """LLaVA's `tokenizer_image_token` on `text`, with character offsets into `text`: one image index per tag."""
        chunks, start = [], 0
        for chunk in text.split(IMAGE_TOKEN):
            chunk_ids, chunk_offsets = encode_with_offsets(self.tokenizer, chunk)
            chunks.append((chunk_ids, [(a + start, b + start) for a, b in chunk_offsets], start))
            start += len(chunk) + len(IMAGE_TOKEN)
        first_ids, first_offsets, _ = chunks[0]
        # As LLaVA: when the first chunk starts with BOS, keep that one and drop the first token of every chunk.
        drop = 1 if first_ids and first_ids[0] == self.tokenizer.bos_token_id else 0
        ids, offsets = first_ids[:drop], first_offsets[:drop]
        for i, (chunk_ids, chunk_offsets, chunk_start) in enumerate(chunks):
            if i:
                tag_start = chunk_start - len(IMAGE_TOKEN)
                ids.append(self.image_token_id)
                offsets.append((tag_start, chunk_start))
            ids.extend(chunk_ids[drop:])
            offsets.extend(chunk_offsets[drop:])
        return ids, offsets

    def preflight(self, sample: TokenizedSample) -> None:
        """Refuse a training sample that would teach nothing or teach the wrong tokens.

        Raises:
            PreflightError: every label is masked (the loss would be 0, silently), a token crosses a reply
                boundary, or the labelled tokens do not decode to the template's reply text.
        """
        sid = sample.sample_id
        if sample.num_label_tokens == 0:
            why = f" after truncation to {self.config.max_length} tokens" if sample.truncated else ""
            raise PreflightError(f"sample {sid}: every label is masked{why}; the sample would train on nothing")
        if sample.boundary_conflicts:
            i, tok = sample.boundary_conflicts[0]
            raise PreflightError(
                f"sample {sid}: template {self.template.name!r} and the tokenizer disagree: token {i} ({tok!r}) "
                f"crosses the boundary of an assistant reply ({len(sample.boundary_conflicts)} such tokens)"
            )
        learned = self.tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX], skip_special_tokens=False)
        got, want = "".join(learned.split()), "".join(sample.learned_text.split())
        if got != want and not (sample.truncated and want.startswith(got)):
            raise PreflightError(
                f"sample {sid}: labelled tokens decode to {learned[:80]!r} but the template's replies are "
                f"{sample.learned_text[:80]!r}"
            )

    # ------------------------------------------------------------------ batches
    def collate(
        self, samples: Sequence[TokenizedSample], padding_side: Literal["left", "right"] = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad token lists into (B, T) input_ids / attention_mask / labels."""
        width = max(len(s.input_ids) for s in samples)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[row, cols] = torch.tensor(s.input_ids)
            labels[row, cols] = torch.tensor(s.labels)
            attention_mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor] | None:
        """One (B, 3, H, W) tensor when all sizes agree, else the list (the model batches equal sizes)."""
        if not images:
            return None
        if len({tuple(x.shape) for x in images}) == 1:
            return torch.stack(list(images))
        return list(images)

    def __call__(
        self,
        conversations: Sequence[list[dict[str, str]]],
        images: Sequence[Image.Image | None],
        sample_ids: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """A training batch: one conversation and at most one image per sample (None for text-only)."""
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images (use None for none)")
        sample_ids = sample_ids or [str(i) for i in range(len(conversations))]
        samples, pixels = [], []
        for conv, image, sid in zip(conversations, images, sample_ids, strict=True):
            sizes = []
            if image is not None:
                x = self.image_processor(image)
                pixels.append(x)
                sizes.append(tuple(x.shape[-2:]))
            samples.append(self.tokenize(conv, sizes, sample_id=sid))
        batch = self.collate(samples)
        batch["pixel_values"] = self.stack_images(pixels)
        return batch

    def prompts(
        self, questions: Sequence[str], images: Sequence[Image.Image | None], system: str | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """A left-padded generation batch. A question with an image but no `<image>` tag gets one prepended."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images (use None for none)")
        samples, pixels = [], []
        for i, (question, image) in enumerate(zip(questions, images, strict=True)):
            sizes = []
            if image is not None:
                if IMAGE_TOKEN not in question:
                    question = f"{IMAGE_TOKEN}\n{question}"
                x = self.image_processor(image)
                pixels.append(x)
                sizes.append(tuple(x.shape[-2:]))
            messages = [{"role": "user", "content": question}]
            if system is not None:
                messages.insert(0, {"role": "system", "content": system})
            samples.append(self.tokenize(messages, sizes, sample_id=str(i), add_generation_prompt=True, check=False))
        batch = self.collate(samples, padding_side="left")
        del batch["labels"]
        batch["pixel_values"] = self.stack_images(pixels)
        return batch

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply: the template's stop marker (when it is one token) and eos."""
        ids = {self.tokenizer.eos_token_id}
        stop = self.template.stop
        if stop and stop in self.tokenizer.get_vocab():
            ids.add(self.tokenizer.convert_tokens_to_ids(stop))
        return sorted(i for i in ids if i is not None)

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self.template.stop and self.template.stop in text:
            text = text.split(self.template.stop)[0]
        return text.strip()

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        cfg = asdict(self.config)
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ConvLlavaProcessor:
        directory = Path(directory)
        raw = json.loads((directory / PROCESSOR_CONFIG).read_text())
        image = raw.pop("image", {})
        for key in ("mean", "std"):
            if key in image:
                image[key] = tuple(image[key])
        config = ProcessorConfig(**raw, image=ImageProcessorConfig(**image))
        return cls(load_tokenizer(directory), config)

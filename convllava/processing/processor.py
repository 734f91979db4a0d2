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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

from convllava.processing.buckets import num_visual_tokens
from convllava.processing.image_processing import ConvLlavaImageProcessor, ImageProcessorConfig, stack_images
from convllava.processing.labels import (
    IGNORE_INDEX,
    PreflightError,
    SequenceTooLongError,
    TokenizedSample,
    pad_batch,
    reply_membership,
)
from convllava.processing.processor_config import ProcessorConfig, read_processor_config
from convllava.processing.templates import IMAGE_TOKEN, ConversationError, ConversationTemplate, get_template
from convllava.processing.tokenizer import encode_llava, ensure_special_tokens, load_tokenizer

Images = Image.Image | Sequence[Image.Image] | None  # one sample's images


class ConvLlavaProcessor(ProcessorMixin):
    """Tokenizer + `ConvLlavaImageProcessor` + conversation template: the one place prompts and batches are built.

    A transformers processor: after `import convllava`, `AutoProcessor.from_pretrained(checkpoint_dir)` loads it, and
    `processor(images=..., text=..., return_tensors="pt")` gives input_ids, attention_mask and pixel_values.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        config: ProcessorConfig | None = None,
        image_processor: ConvLlavaImageProcessor | None = None,
    ) -> None:
        config = config or ProcessorConfig()
        if image_processor is not None and image_processor.config != config.image:
            raise ValueError(f"image_processor {image_processor.config} disagrees with the config's {config.image}")
        super().__init__(
            tokenizer=ensure_special_tokens(tokenizer),
            image_processor=image_processor or ConvLlavaImageProcessor(config.image),
        )
        self.config = config
        self.template: ConversationTemplate = get_template(self.config.template)
        self.image_token = IMAGE_TOKEN
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
        spans, pos = [], 0
        for t, learned in segments:
            if learned:
                spans.append((pos, pos + len(t)))
            pos += len(t)
        sample = self._tokenize_text(text, spans, image_sizes, sample_id)
        if check and not add_generation_prompt:
            self.preflight(sample)
        return sample

    def _tokenize_text(
        self, text: str, spans: list[tuple[int, int]], image_sizes: Sequence[tuple[int, int]], sample_id: str
    ) -> TokenizedSample:
        """Tokenize rendered `text`, label the tokens inside `spans` (character ranges), expand and truncate."""
        n_tags = text.count(IMAGE_TOKEN)
        if n_tags != len(image_sizes):
            raise ConversationError(
                f"sample {sample_id}: {n_tags} {IMAGE_TOKEN} tag(s) in the conversation but {len(image_sizes)} "
                "image(s); each image needs exactly one tag"
            )
        if self.config.tokenization == "llava":
            ids, offsets = encode_llava(self.tokenizer, text, self.image_token_id)
        else:
            enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels: list[int] = []
        conflicts: list[tuple[int, str]] = []
        for i, (token_id, (start, end), (inside, crosses)) in enumerate(
            zip(ids, offsets, reply_membership(offsets, spans), strict=True)
        ):
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

        return TokenizedSample(
            input_ids=input_ids,
            labels=out_labels,
            num_image_tokens=n_image_tokens,
            truncated=truncated,
            sample_id=sample_id,
            boundary_conflicts=conflicts,
            learned_text="".join(text[a:b] for a, b in spans),
        )

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
        return pad_batch(
            [s.input_ids for s in samples], [s.labels for s in samples], self.tokenizer.pad_token_id, padding_side
        )

    stack_images = staticmethod(stack_images)

    def _images(self, images: Images) -> list[torch.Tensor]:
        images = [] if images is None else [images] if isinstance(images, Image.Image) else list(images)
        return [self.image_processor.transform(image) for image in images]

    def __call__(
        self,
        images: Images | Sequence[Images] = None,
        text: str | Sequence[str] | None = None,
        *,
        conversations: Sequence[list[dict[str, str]]] | None = None,
        sample_ids: Sequence[str] | None = None,
        return_tensors: str | None = None,
        padding_side: Literal["left", "right"] = "right",
        **kwargs,
    ) -> BatchFeature:
        """A right-padded batch, from raw `text` (as transformers processors) or from `conversations`.

        Args:
            images: with `text`: all images in the order of the `<image>` tags over the texts (or one list per text);
                with `conversations`: one entry per conversation, None, an image or a list of images.
            text: prompts already in the template's format, each `<image>` tag expanded into the image's visual
                tokens; no labels.
            conversations: LLaVA or chat turns, rendered with the template; `labels` mask all but the replies and
                every sample passes `preflight` (a training batch).
            return_tensors: None or "pt" (the batch is always torch tensors).
            padding_side: "left" for generation from raw `text`.

        Raises:
            ValueError: both or neither of text and conversations, images that do not pair with the samples, or
                an unsupported `return_tensors`; the errors of `tokenize`.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; the processor's options are its ProcessorConfig")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        if (text is None) == (conversations is None):
            raise ValueError("pass exactly one of text (raw prompts) and conversations (templated, with labels)")
        if conversations is not None:
            per_sample = [None] * len(conversations) if images is None else list(images)
            if len(per_sample) != len(conversations):
                raise ValueError(f"{len(conversations)} conversations but {len(per_sample)} images (None for none)")
            sample_ids = sample_ids or [str(i) for i in range(len(conversations))]
            samples, pixels = [], []
            for conv, sample_images, sid in zip(conversations, per_sample, sample_ids, strict=True):
                x = self._images(sample_images)
                pixels.extend(x)
                samples.append(self.tokenize(conv, [tuple(t.shape[-2:]) for t in x], sample_id=sid))
            return BatchFeature({**self.collate(samples), "pixel_values": stack_images(pixels)})
        texts = [text] if isinstance(text, str) else list(text)
        flat = (
            []
            if images is None
            else [images]
            if isinstance(images, Image.Image)
            else [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
        )
        n_tags = [t.count(IMAGE_TOKEN) for t in texts]
        if sum(n_tags) != len(flat):
            raise ValueError(f"{sum(n_tags)} {IMAGE_TOKEN} tag(s) in the texts but {len(flat)} image(s)")
        pixels = self._images(flat)
        sizes = [tuple(x.shape[-2:]) for x in pixels]
        samples, start = [], 0
        for i, (t, n) in enumerate(zip(texts, n_tags, strict=True)):
            samples.append(
                self._tokenize_text(t, [], sizes[start : start + n], sample_ids[i] if sample_ids else str(i))
            )
            start += n
        batch = self.collate(samples, padding_side)
        del batch["labels"]
        return BatchFeature({**batch, "pixel_values": stack_images(pixels)})

    # ------------------------------------------------------------------ generation prompts
    def generation_sample(
        self,
        prompt: str | list[dict[str, str]],
        images: Images = None,
        system: str | None = None,
        sample_id: str = "?",
    ) -> tuple[TokenizedSample, list[torch.Tensor]]:
        """One generation prompt (ending with the assistant prefix) and its processed images, (3, H, W) each.

        `prompt` is one user question or a conversation that ends with a user turn. The images fill the `<image>`
        tags in order; when no turn has a tag, one per image is prepended to the first user turn
        (`"<image>\n" * n + text`, LLaVA's layout for one image).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        pixels = self._images(images)
        tagged = any(IMAGE_TOKEN in str(m.get("content", m.get("value", ""))) for m in messages)
        first_user = next((m for m in messages if m.get("role", m.get("from")) in ("user", "human")), None)
        if pixels and not tagged and first_user is not None:
            key = "content" if "content" in first_user else "value"
            first_user[key] = f"{IMAGE_TOKEN}\n" * len(pixels) + first_user[key]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        sizes = [tuple(x.shape[-2:]) for x in pixels]
        return self.tokenize(messages, sizes, sample_id=sample_id, add_generation_prompt=True, check=False), pixels

    def generation_batch(
        self,
        prompts: Sequence[tuple[str | list[dict[str, str]], Images]],
        system: str | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> BatchFeature:
        """A left-padded generation batch of (prompt, images) pairs; see `generation_sample`.

        Raises:
            ConversationError: a prompt's `<image>` tags do not match its images one to one, or its text is empty.
        """
        sample_ids = list(sample_ids) if sample_ids is not None else [str(i) for i in range(len(prompts))]
        if len(sample_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sample_ids)} sample ids")
        samples, pixels = [], []
        for (prompt, images), sample_id in zip(prompts, sample_ids, strict=True):
            sample, sample_pixels = self.generation_sample(prompt, images, system, sample_id)
            samples.append(sample)
            pixels.extend(sample_pixels)
        batch = self.collate(samples, padding_side="left")
        del batch["labels"]
        return BatchFeature({**batch, "pixel_values": stack_images(pixels)})

    def prompts(
        self, questions: Sequence[str], images: Sequence[Image.Image | None], system: str | None = None
    ) -> BatchFeature:
        """A left-padded generation batch of questions with at most one image each (None for none)."""
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images (use None for none)")
        return self.generation_batch(list(zip(questions, images, strict=True)), system)

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
    def to_dict(self) -> dict[str, Any]:
        """processor_config.json: the ProcessorConfig, its image part nested as transformers nests image processors."""
        fields = self.config.model_dump(exclude={"image"})
        return {"processor_class": type(self).__name__, **fields, "image_processor": self.image_processor.to_dict()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ConvLlavaProcessor:
        """Load from a local checkpoint directory (what `AutoProcessor.from_pretrained` calls).

        AutoProcessor's hub options (`cache_dir`, `revision`, ...) are accepted and unused: nothing is downloaded.
        """
        directory = Path(pretrained_model_name_or_path)
        return cls(load_tokenizer(directory), read_processor_config(directory))

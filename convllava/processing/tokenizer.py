"""Tokenizers: any Hugging Face fast tokenizer from a local path or `s3://`, and the shipped `tiny` one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from convllava.io.storage import resolve_local
from convllava.processing.templates import IMAGE_TOKEN

TINY_TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "tiny-tokenizer"


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure `<image>` is one special token and a pad token exists.

    A sentencepiece directory (Llama/Vicuna and LLaVA-trained checkpoints ship `tokenizer.model` and
    `tokenizer_config.json` without `tokenizer.json`) is converted by transformers to a fast tokenizer.

    Args:
        name_or_path: `tiny` (shipped with the package), a local directory, or an `s3://` prefix.
            Hub names are never contacted.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer (character offsets are needed for label masking).
    """
    path = TINY_TOKENIZER_DIR if str(name_or_path) == "tiny" else resolve_local(name_or_path)
    tokenizer = _tokenizer_class(path).from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(
            f"{name_or_path}: a fast tokenizer (tokenizer.json) is required for offset-based label masking"
        )
    return ensure_special_tokens(tokenizer)


def _tokenizer_class(path: Path) -> type:
    """The class `tokenizer_config.json` names when the directory has no `tokenizer.json`, else AutoTokenizer.

    transformers 5 ignores `tokenizer_class` for some model types: for `"model_type": "llava"` (the released
    checkpoints' config.json) AutoTokenizer builds a generic backend from `tokenizer.model`, which has no dummy
    prefix, instead of the `LlamaTokenizer` the checkpoint names (and was trained with). A `tokenizer.json`, when
    present, is read as it is by either.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = path / "tokenizer_config.json"
    if (path / "tokenizer.json").is_file() or not config.is_file():
        return AutoTokenizer
    name = json.loads(config.read_text()).get("tokenizer_class")
    return (tokenizer_class_from_name(name) if isinstance(name, str) else None) or AutoTokenizer


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add `<image>` as a special token if missing (it then gets id len(tokenizer), which the model may
    keep outside the LM's vocabulary) and fall back to unk/eos for padding."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def adds_dummy_prefix(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the fast tokenizer adds sentencepiece's dummy prefix `▁` with a `Metaspace` pre-tokenizer (what
    transformers builds from a Llama/Vicuna `tokenizer.model`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    return isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme in ("first", "always")


def encode_with_offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`tokenizer(text).input_ids` and character offsets, the dummy prefix added as sentencepiece adds it.

    tokenizers' `Metaspace` skips the dummy prefix when the text already starts with a space; sentencepiece (and the
    slow LlamaTokenizer LLaVA trained with) always adds it: " ASSISTANT:" is [`▁`, `▁ASSISTANT`, `:`] there but
    [`▁ASSISTANT`, `:`] here. Given " " + text, `Metaspace` adds no prefix and yields exactly sentencepiece's pieces
    of text; the offsets are shifted back, so a dummy `▁` standing alone spans no character. Text after a special
    token (`</s>USER`) gets no prefix in either (`legacy: false`). Other tokenizers encode `text` as it is.
    """
    shift = 1 if text and adds_dummy_prefix(tokenizer) else 0
    enc = tokenizer(" " * shift + text, add_special_tokens=True, return_offsets_mapping=True)
    offsets = [(max(a - shift, 0), max(b - shift, 0)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], offsets


def encode_llava(
    tokenizer: PreTrainedTokenizerBase, text: str, image_token_id: int
) -> tuple[list[int], list[tuple[int, int]]]:
    """LLaVA's `tokenizer_image_token` on `text`, with character offsets into `text`: one image index per tag.

    The text is split at each `<image>` and every chunk tokenized on its own (`encode_with_offsets`); as LLaVA does,
    when the first chunk starts with BOS that one is kept and the first token of every chunk dropped.
    """
    chunks, start = [], 0
    for chunk in text.split(IMAGE_TOKEN):
        chunk_ids, chunk_offsets = encode_with_offsets(tokenizer, chunk)
        chunks.append((chunk_ids, [(a + start, b + start) for a, b in chunk_offsets], start))
        start += len(chunk) + len(IMAGE_TOKEN)
    first_ids, first_offsets, _ = chunks[0]
    drop = 1 if first_ids and first_ids[0] == tokenizer.bos_token_id else 0
    ids, offsets = first_ids[:drop], first_offsets[:drop]
    for i, (chunk_ids, chunk_offsets, chunk_start) in enumerate(chunks):
        if i:
            ids.append(image_token_id)
            offsets.append((chunk_start - len(IMAGE_TOKEN), chunk_start))
        ids.extend(chunk_ids[drop:])
        offsets.extend(chunk_offsets[drop:])
    return ids, offsets

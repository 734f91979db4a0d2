"""Tokenizers: any Hugging Face fast tokenizer from a local path or `s3://`, and the shipped `tiny` one."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from convllava.storage import resolve_local
from convllava.templates import IMAGE_TOKEN

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny-tokenizer"


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure `<image>` is one special token and a pad token exists.

    Args:
        name_or_path: `tiny` (shipped with the package), a local directory, or an `s3://` prefix.
            Hub names are never contacted.

    Raises:
        ValueError: the tokenizer is not a fast tokenizer (character offsets are needed for label masking).
    """
    path = TINY_TOKENIZER_DIR if str(name_or_path) == "tiny" else resolve_local(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(
            f"{name_or_path}: a fast tokenizer (tokenizer.json) is required for offset-based label masking"
        )
    return ensure_special_tokens(tokenizer)


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add `<image>` as a special token if missing (it then gets id len(tokenizer), which the model may
    keep outside the LM's vocabulary) and fall back to unk/eos for padding."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer

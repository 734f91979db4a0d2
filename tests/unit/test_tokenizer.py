"""The tokenizer that released checkpoints ship: a sentencepiece `tokenizer.model` without `tokenizer.json`
(lmsys/vicuna-7b-v1.5, LLaVA-trained checkpoints) loads as a fast tokenizer whose ids are sentencepiece's and
whose offsets point at the characters each token covers."""

from __future__ import annotations

import pytest
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from convllava.processing.templates import VICUNA_SYSTEM
from convllava.processing.tokenizer import adds_dummy_prefix, encode_with_offsets, load_tokenizer

TEXTS = [
    VICUNA_SYSTEM,
    f"{VICUNA_SYSTEM} USER: What colour is the circle? ASSISTANT: Red.",
    "What is in the image?\nDescribe it in 12 words.",
    "There are 1234567 objects, 0.25 of them red.",
    "Two  spaces,\ttabs\n\nand a blank line.",
    "Ünïcödé, emoji 🐱 and 東京: byte fallback.",
    "Red.</s>USER: And the square? ASSISTANT: Blue.</s>",
    "a </s> b",
    "x",
    "",
]


@pytest.fixture(scope="module")
def vicuna_tokenizer(vicuna_tokenizer_dir):
    return load_tokenizer(vicuna_tokenizer_dir)


def _token_bytes(piece: str) -> bytes:
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def test_vicuna_layout_loads_as_a_fast_tokenizer(vicuna_tokenizer_dir, vicuna_tokenizer, llama_reference):
    assert sorted(p.name for p in vicuna_tokenizer_dir.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tok = vicuna_tokenizer
    assert tok.is_fast and adds_dummy_prefix(tok)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token == "<unk>"  # Vicuna ships none; LLaVA pads with unk too
    assert llama_reference.sp.get_piece_size() == 800
    assert tok.convert_tokens_to_ids("<image>") == 800  # added after the sentencepiece vocabulary
    assert tok.convert_ids_to_tokens(list(range(3, 6))) == ["<0x00>", "<0x01>", "<0x02>"]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_sentencepieces_and_offsets_cover_each_tokens_characters(vicuna_tokenizer, llama_reference, text):
    tok = vicuna_tokenizer
    enc = tok(text, return_offsets_mapping=True)
    want = llama_reference.encode(text)
    assert enc.input_ids == want
    if "</s>" not in text:
        assert want == [1] + llama_reference.sp.encode(text)  # sentencepiece itself, with BOS
    assert enc.offset_mapping[0] == (0, 0)  # BOS spans nothing
    # Tokens sharing one span (the bytes of one character) together are that character; spans tile the text.
    groups: dict[tuple[int, int], bytes] = {}
    for piece, span in zip(tok.convert_ids_to_tokens(enc.input_ids[1:]), enc.offset_mapping[1:], strict=True):
        groups[span] = groups.get(span, b"") + _token_bytes(piece)
    pos = 0
    for i, ((a, b), raw) in enumerate(groups.items()):
        assert a == pos, (text, a, pos)
        surface = raw.decode()
        assert surface == (" " + text[a:b] if i == 0 else text[a:b]), (surface, text[a:b])  # the dummy prefix
        pos = b
    assert pos == len(text)


def test_leading_space_gets_sentencepieces_dummy_prefix(vicuna_tokenizer, llama_reference):
    """tokenizers' Metaspace skips the dummy prefix before a leading space; sentencepiece does not."""
    tok, sp = vicuna_tokenizer, llama_reference.sp
    text = " ASSISTANT: Red."
    assert sp.id_to_piece(sp.encode(text)[:2]) == ["▁", "▁ASSISTANT"]
    assert tok(text).input_ids == [1] + sp.encode(text)[1:]  # one ▁ short
    ids, offsets = encode_with_offsets(tok, text)
    assert ids == [1] + sp.encode(text)
    assert offsets[:3] == [(0, 0), (0, 0), (0, 10)]  # BOS, the dummy ▁ (spans nothing), " ASSISTANT"
    for text in [*TEXTS, " ", "  two", "\nWhat", " x</s> y"]:
        assert encode_with_offsets(tok, text)[0] == llama_reference.encode(text), text


def test_reference_is_transformers_legacy_false_sentencepiece_path(vicuna_tokenizer_dir, llama_reference):
    """The test reference agrees with transformers' own `legacy: false` sentencepiece code (dummy prefix off in the
    model, `<unk>` trick in `_tokenize`), fed with the `▁` that LlamaTokenizer 4.x's `tokenize` put in front."""
    slow = SentencePieceBackend(
        vocab_file=str(vicuna_tokenizer_dir / "tokenizer.model"),
        legacy=False,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    texts = [t for t in TEXTS if t] + [" ASSISTANT: Red.</s>USER: Hi", "\nWhat is it?", "Red.</s> USER"]
    for text in texts:
        ids = slow.convert_tokens_to_ids(slow.tokenize("\u2581" + text))
        assert [1, *ids] == llama_reference.encode(text), text
    # legacy: false means no dummy prefix after a special token: "</s>USER" is not "</s>▁USER".
    sp = llama_reference.sp
    assert sp.id_to_piece(llama_reference.encode("a</s>USER")) == ["<s>", "▁a", "</s>", "U", "SER"]
    assert sp.id_to_piece(sp.encode("USER")) == ["▁USER"]

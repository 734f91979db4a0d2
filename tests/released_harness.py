"""Helpers shared by the unit and integration tests of released."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_harness import TOWER, hf_convnext, randomize_, reference_logits, write_llava_llm, write_tower
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class ReleasedSpm:
    """Tower, projector and a Llama LM over the sentencepiece vocabulary, written in the released layout."""

    def __init__(self, root: Path, tokenizer_dir: Path) -> None:
        vocab = len(
            __import__("sentencepiece").SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        )
        self.image_token_id = vocab  # `<image>` is added after the vocabulary, as LLaVA keeps it outside
        self.tower = hf_convnext()
        llm_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            attn_implementation="eager",
        )
        self.llm = randomize_(LlamaForCausalLM(llm_config), seed=1)
        self.projector = randomize_(
            nn.Sequential(nn.Linear(TOWER["hidden_sizes"][-1], 64), nn.GELU(), nn.Linear(64, 64)), 2
        )
        self.tower_dir = write_tower(self.tower, root / "tower")
        self.llm_dir = write_llava_llm(root / "llm", self.llm, self.projector, self.tower_dir)
        config = json.loads((self.llm_dir / "config.json").read_text())
        # The weights here are float32 (so the reference comparison is exact up to kernels); "auto" keeps them so.
        (self.llm_dir / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}, indent=2))
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, self.llm_dir / f.name)
        assert not (self.llm_dir / "tokenizer.json").exists()  # as vicuna-7b-v1.5 ships it

    @torch.no_grad()
    def greedy(self, input_ids: list[int], pixels: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
        ids = torch.tensor([input_ids])
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = reference_logits(self.tower, self.projector, self.llm, ids, pixels, self.image_token_id)
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return new


@pytest.fixture(scope="module")
def released_spm(tmp_path_factory, vicuna_tokenizer_dir) -> ReleasedSpm:
    return ReleasedSpm(tmp_path_factory.mktemp("released-spm"), vicuna_tokenizer_dir)

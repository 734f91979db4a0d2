"""Fake released LLaVA-layout checkpoints (tiny random models written in exactly the released layout), the
reference forward pass through the modules they were written from, and the fixtures built on them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextModel, LlamaConfig, LlamaForCausalLM

from convllava.modeling.llava_checkpoint import from_llava_checkpoint
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.tokenizer import load_tokenizer

TOWER = dict(depths=[1, 1, 2, 1, 1], hidden_sizes=[16, 32, 64, 96, 128])
LLM = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
QUESTION = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights of unit scale everywhere (incl. layer scales and norms), so a mis-mapped key shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim > 1 else 1.0))
    return module.eval()


def hf_convnext(depths=TOWER["depths"], hidden_sizes=TOWER["hidden_sizes"], seed: int = 0) -> ConvNextModel:
    config = ConvNextConfig(num_stages=len(depths), depths=depths, hidden_sizes=hidden_sizes, image_size=256)
    return randomize_(ConvNextModel(config), seed)


def write_tower(tower: ConvNextModel, directory: Path) -> Path:
    """A released-style tower: config.json + pytorch_model.bin. (transformers 5 ignores
    `save_pretrained(safe_serialization=False)` and writes safetensors, so the .bin is written directly.)"""
    tower.config.save_pretrained(directory)
    torch.save(tower.state_dict(), directory / "pytorch_model.bin")
    return directory


def write_llava_llm(
    directory: Path, llm: LlamaForCausalLM, projector: nn.Sequential, tower_dir: Path, state: dict | None = None
) -> Path:
    """A released-style LLM dir: LLaVA config.json and LLM + `model.mm_projector.*` weights in two .bin shards."""
    directory.mkdir(parents=True)
    state = dict(llm.state_dict() if state is None else state)
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    keys = list(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    config = llm.config.to_dict() | {
        "model_type": "llava",
        "architectures": ["LlavaLlamaForCausalLM"],
        "torch_dtype": "float16",  # what the released config.json files say
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": 128,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -1,
        "mm_use_im_start_end": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


class Released:
    """A fake released checkpoint on disk plus the reference modules it was written from."""

    def __init__(self, root: Path) -> None:
        self.tower = hf_convnext()
        self.llm = randomize_(LlamaForCausalLM(LlamaConfig(**LLM, attn_implementation="eager")), seed=1)
        self.projector = randomize_(nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 64)), seed=2)
        self.tower_dir = write_tower(self.tower, root / "tower")
        self.llm_dir = write_llava_llm(root / "llm", self.llm, self.projector, self.tower_dir)
        load_tokenizer("tiny").save_pretrained(self.llm_dir)

    def logits(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_token_id: int) -> torch.Tensor:
        return reference_logits(self.tower, self.projector, self.llm, input_ids, pixel_values, image_token_id)


@torch.no_grad()
def reference_logits(
    tower: ConvNextModel,
    projector: nn.Module,
    llm: LlamaForCausalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """HF tower → projector → scattered into the LM's embeddings at the placeholders → LM logits."""
    features = tower(pixel_values).last_hidden_state.flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, h·w, C)
    features = projector(features).flatten(0, 1)  # (B·h·w, D)
    mask = input_ids == image_token_id
    embeds = llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))  # (B, T, D)
    embeds[mask] = features
    return llm(inputs_embeds=embeds).logits


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Released:
    """A fake released checkpoint, written once per test module."""
    return Released(tmp_path_factory.mktemp("released"))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """One seeded random 256×256 image batch: (1, 3, 256, 256)."""
    return torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def input_ids(released) -> torch.Tensor:
    """QUESTION tokenized by the released checkpoint's processor for one 256×256 image: (1, T)."""
    processor = from_llava_checkpoint(released.llm_dir)[1]
    sample = processor.tokenize(QUESTION, [(256, 256)], add_generation_prompt=True, check=False)
    return torch.tensor([sample.input_ids])


@torch.no_grad()
def logits_of(model: ConvLlavaForCausalLM, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, pixel_values=pixels).logits


def llm_copy(released: Released, tmp_path: Path) -> Path:
    return Path(shutil.copytree(released.llm_dir, tmp_path / "llm"))

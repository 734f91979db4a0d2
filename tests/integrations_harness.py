"""Fixtures shared by the unit and integration tests of the lmms-eval / VLMEvalKit adapters."""

from pathlib import Path

import pytest
import torch

from convllava.modeling.checkpoint import save_checkpoint
from convllava.modeling.model import ConvLlavaForCausalLM
from convllava.processing.processor import ConvLlavaProcessor

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
N_EVAL = 10


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_config) -> Path:
    torch.manual_seed(0)
    model = ConvLlavaForCausalLM(tiny_config).eval()
    return save_checkpoint(model, ConvLlavaProcessor.for_model(tiny_config, "tiny"), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    from pipelines.demo.data import generate_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_data(root, seed=0, n_caption=N_EVAL, n_instruct=N_EVAL, n_eval=N_EVAL)
    return root


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    # lmms-eval's datasets cache: a fresh folder, never ~/.cache.
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return tmp_path

"""Shared fixtures: tiny model/processor, real sample photos, a real HTTP S3 endpoint (moto's server)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_config():
    from convllava.config import ConvLlavaConfig

    return ConvLlavaConfig.from_preset("tiny", attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_processor(tiny_config):
    from convllava.processor import ConvLlavaProcessor

    return ConvLlavaProcessor.for_model(tiny_config, "tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    from convllava.modeling import ConvLlavaForCausalLM

    torch.manual_seed(0)
    return ConvLlavaForCausalLM(tiny_config).eval()


@pytest.fixture(scope="session")
def photos():
    """Real photos shipped inside scikit-image (decoded from PNG/JPEG files on disk)."""
    from convllava.sample_images import sample_photos

    return sample_photos()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1: a real HTTP S3 endpoint for boto3 and pyarrow."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request, tmp_path, monkeypatch):
    """A fresh bucket on the moto server; the convllava download cache goes to tmp_path."""
    import boto3

    monkeypatch.setenv("CONVLLAVA_CACHE", str(tmp_path / "cache"))
    name = "test-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting Ray costs 20–30 s on 2 cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def build_demo_shards(root, captions: int, instruct: int, evaluation: int):
    """Demo data (seeded) preprocessed at resolution 256 into ROOT/shards; returns that path."""
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo_data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    generate_demo_data(root / "data", seed=0, n_caption=captions, n_instruct=instruct, n_eval=evaluation)
    run_preprocess(Mixture.from_yaml(root / "data" / "mixture.yaml"), PreprocessConfig(resolution=256),
                   str(root / "shards"), echo=lambda *_: None)  # fmt: skip
    return root / "shards"


@pytest.fixture(scope="session")
def demo_shards_builder():
    """`build_demo_shards`, for test modules that need demo shards of their own size (conftest is not importable)."""
    return build_demo_shards


@pytest.fixture(scope="session")
def shards(ray_local, tmp_path_factory):
    """Demo shards shared by the training tests (built once per session)."""
    return build_demo_shards(tmp_path_factory.mktemp("train-data"), 120, 120, 10)

"""Shared fixtures: tiny model/processor, real sample photos, a real HTTP S3 endpoint (moto's server)."""

from __future__ import annotations

import io
import json
import os
import random
import re
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that a topic's unit and integration tests share live beside its helpers.
pytest_plugins = [
    "checkpoint_harness",
    "eval_gate_harness",
    "integrations_harness",
    "released_harness",
    "tracking_harness",
]


@pytest.fixture(scope="session")
def tiny_config():
    from convllava.modeling.config import ConvLlavaConfig

    return ConvLlavaConfig.from_preset("tiny", attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_processor(tiny_config):
    from convllava.processing.processor import ConvLlavaProcessor

    return ConvLlavaProcessor.for_model(tiny_config, "tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    from convllava.modeling.model import ConvLlavaForCausalLM

    torch.manual_seed(0)
    return ConvLlavaForCausalLM(tiny_config).eval()


@pytest.fixture(scope="session")
def photos():
    """Real photos shipped inside scikit-image (decoded from PNG/JPEG files on disk)."""
    from convllava.data.sample_images import sample_photos

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
    from pipelines.demo.data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    generate_demo_data(root / "data", seed=0, n_caption=captions, n_instruct=instruct, n_eval=evaluation)
    run_preprocess(
        Mixture.from_yaml(root / "data" / "mixture.yaml"),
        PreprocessConfig(resolution=256),
        str(root / "shards"),
        echo=lambda *_: None,
    )
    return root / "shards"


@pytest.fixture(scope="session")
def demo_shards_builder():
    """`build_demo_shards`, for test modules that need demo shards of their own size (conftest is not importable)."""
    return build_demo_shards


@pytest.fixture(scope="session")
def shards(ray_local, tmp_path_factory):
    """Demo shards shared by the training tests (built once per session)."""
    return build_demo_shards(tmp_path_factory.mktemp("train-data"), 120, 120, 10)


class LlamaReference:
    """What a slow `LlamaTokenizer` with `legacy: false` (the tokenizer LLaVA trained with) returns for
    `tokenizer(text).input_ids`, computed with sentencepiece alone: BOS, then the text with `<s>`, `</s>` and `<unk>`
    split out as their ids; the text before the first special token is encoded with sentencepiece's dummy prefix,
    text after a special token without it (what `legacy: false` changed)."""

    SPECIAL = re.compile("(<s>|</s>|<unk>)")

    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode(self, text: str) -> list[int]:
        ids = [self.sp.bos_id()]
        for i, part in enumerate(self.SPECIAL.split(text)):
            if i % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend((self.sp if i == 0 else self.sp_no_prefix).encode(part))
        return ids


def vicuna_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """English-like training sentences: the Vicuna system prompt, USER/ASSISTANT turns, questions, numbers.
    Newlines stay out, so `\\n` is the byte-fallback piece `<0x0A>` as in Llama's vocabulary."""
    from convllava.processing.templates import VICUNA_SYSTEM

    rng = random.Random(seed)
    words = re.findall(r"[A-Za-z']+", VICUNA_SYSTEM)
    words += (
        "what is in the image colour color of this that circle square triangle red blue green yellow describe it "
        "there are how many objects yes no left right top bottom picture photo shows a cat dog person on table "
        "and the square answer question word phrase single please provide short brief detailed"
    ).split()
    lines = [VICUNA_SYSTEM] * 50
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize()
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 10))).capitalize()
        number = rng.randint(0, 10 ** rng.randint(1, 6))
        lines.append(f"{VICUNA_SYSTEM} USER: {q}? ASSISTANT: {a} {number}.")
        lines.append(f"USER: {q}, {rng.random():.2f} ASSISTANT: {a}.")
    return lines


@pytest.fixture(scope="session")
def vicuna_tokenizer_dir(tmp_path_factory) -> Path:
    """A small Llama-style sentencepiece BPE tokenizer laid out as lmsys/vicuna-7b-v1.5 (and LLaVA-trained
    checkpoints) ship it: tokenizer.model, tokenizer_config.json and special_tokens_map.json, no tokenizer.json."""
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("vicuna-tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(vicuna_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=800,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    specials = {"bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": added("<unk>")}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        **{k: {"__type": "AddedToken", **v} for k, v in specials.items()},
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return directory


@pytest.fixture(scope="session")
def llama_reference(vicuna_tokenizer_dir) -> LlamaReference:
    return LlamaReference(vicuna_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def executed_pipeline_run(ray_local, tmp_path_factory):
    """One small pipeline run (`dag-test`, the demo's three stages), shared by the DAG tests, the MLflow UI tests and
    the stage-records tests: (root, config, result, recorder), the `Recorder` having counted the plans and config
    uploads of the run (this process is its driver)."""
    from pipeline_harness import Recorder, small_config

    from jobs.dag.runner import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    config = small_config(root / "pipeline.yaml", "dag-test")
    with pytest.MonkeyPatch.context() as mp:
        recorder = Recorder(mp)
        result = run_pipeline(str(config), workdir=str(root / "wd"))
    return root, config, result, recorder


@pytest.fixture(scope="session")
def executed_pipeline(executed_pipeline_run):
    """The shared small pipeline run: (root, config, result)."""
    return executed_pipeline_run[:3]

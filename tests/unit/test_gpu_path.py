"""The paper-scale GPU path, checked on CPU: collectives on the engine's device, the flash-attn → sdpa fallback,
ZeRO-3 construction that never holds a full copy per rank, checkpoint verification from the storage listing, and
the CPU-offload DeepSpeed config training."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from convllava.modeling.attention import attention_unavailable, resolve_attn_implementation
from jobs.train.checkpoints import CheckpointIncomplete, verify_stored_checkpoint, write_completion_marker
from jobs.train.device import DeviceCollectives
from jobs.train.recipe import StageRecipe

ROOT = Path(__file__).resolve().parents[2]


def test_device_collectives_build_on_the_engine_device_and_refuse_others(monkeypatch):
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None: seen.append((t.device, op)))
    c = DeviceCollectives(torch.device("meta"))  # any device other than the CPU the values come from
    with pytest.raises(NotImplementedError):  # the reduced values cannot be read back off meta: after the call
        c.sum([1.0, 2.0])
    assert [d for d, _ in seen] == [torch.device("meta")]
    with pytest.raises(RuntimeError, match=r"collective on a tensor on cpu; the engine computes on meta"):
        c._check(torch.zeros(2))


def test_the_recipe_issues_no_collective_outside_device_collectives():
    """Every `dist.` call of StageRecipe goes through DeviceCollectives (a CPU tensor under NCCL is an error)."""
    import inspect

    source = inspect.getsource(StageRecipe)
    assert "dist.all_reduce" not in source and "dist.barrier" not in source and "dist.broadcast" not in source
    assert "self.collectives.sum(" in source and "self.collectives.barrier()" in source


def test_attention_falls_back_to_sdpa_and_says_why(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import flash_attn raises ImportError
    assert "flash_attn does not import" in attention_unavailable("flash_attention_2", "cpu")
    with caplog.at_level("WARNING", logger="convllava.modeling.attention"):
        assert resolve_attn_implementation("flash_attention_2", "cpu") == "sdpa"
    assert "flash_attention_2 requested, using sdpa: flash_attn does not import" in caplog.text
    # flash-attn installed, but this worker computes on the CPU (or a pre-Ampere GPU): still sdpa.
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attention_unavailable("flash_attention_2", "cpu") == "it needs a CUDA device, this worker computes on cpu"
    assert resolve_attn_implementation("flash_attention_2", "cpu") == "sdpa"
    if not torch.cuda.is_available():
        assert attention_unavailable("flash_attention_2") == "no CUDA device"
    for kept in ("sdpa", "eager", None):
        assert resolve_attn_implementation(kept, "cpu") == kept


def test_partitions_are_read_from_the_checkpoint_slice_by_slice(tmp_path):
    """`FlatRanges.read` gives any flat range of any tensor (1-D, 2-D, 4-D, scalar) as the flattened tensor would,
    reading only the rows that hold it; a tensor the checkpoint lacks is named."""
    from safetensors.torch import save_file

    from convllava.modeling.weights import CheckpointError, FlatRanges

    torch.manual_seed(0)
    tensors = {"a": torch.randn(7), "b": torch.randn(5, 3), "c": torch.randn(3, 2, 2, 5), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ranges = FlatRanges(tmp_path)
    assert ranges.keys() == set(tensors)
    for name, t in tensors.items():
        flat = t.reshape(-1)
        for start in range(flat.numel()):
            for end in range(start + 1, flat.numel() + 1):
                assert torch.equal(ranges.read(name, start, end), flat[start:end]), (name, start, end)
    with pytest.raises(CheckpointError, match="'missing' is not in the checkpoint"):
        ranges.read("missing", 0, 1)


def _checkpoint(directory: Path, world: int, sharded: bool) -> None:
    (directory / "model").mkdir(parents=True)
    if sharded:
        (directory / "model" / "model-00001-of-00002.safetensors").write_bytes(b"a" * 100)
        (directory / "model" / "model-00002-of-00002.safetensors").write_bytes(b"b" * 50)
        (directory / "model" / "model.safetensors.index.json").write_text(
            json.dumps(
                {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
            )
        )
    else:
        (directory / "model" / "model.safetensors").write_bytes(b"m" * 120)
    (directory / "trainer_state.json").write_text(json.dumps({"step": 7, "total_steps": 7}))
    (directory / "state").mkdir()
    for rank in range(world):
        (directory / "state" / f"rank{rank}.safetensors").write_bytes(bytes([rank]) * 64)
        write_completion_marker(directory, rank)


class _Handler(pafs.FileSystemHandler):
    """A LocalFileSystem that records every file opened for reading (what a download would read)."""

    def __init__(self) -> None:
        self.fs, self.opened = pafs.LocalFileSystem(), []

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)

    def create_dir(self, *a):
        raise NotImplementedError

    delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = move = copy_file = create_dir
    open_output_stream = open_append_stream = create_dir


@pytest.mark.parametrize("sharded", [False, True])
def test_a_stored_checkpoint_is_verified_from_markers_and_listing_only(tmp_path, sharded):
    _checkpoint(tmp_path / "ck", 2, sharded)
    handler = _Handler()
    state = verify_stored_checkpoint(pafs.PyFileSystem(handler), str(tmp_path / "ck"), 2)
    assert state == {"step": 7, "total_steps": 7}
    read = sorted(Path(p).name for p in handler.opened)
    expected = ["COMPLETE.rank0.json", "COMPLETE.rank1.json", "trainer_state.json"]
    assert read == sorted(expected + (["model.safetensors.index.json"] if sharded else []))  # no weights read


def test_a_stored_checkpoint_that_is_incomplete_is_refused_naming_what(tmp_path):
    root = tmp_path / "ck"
    _checkpoint(root, 2, sharded=True)
    fs = pafs.LocalFileSystem()
    with pytest.raises(CheckpointIncomplete, match=r"rank 2 never finished writing \(no COMPLETE.rank2.json\)"):
        verify_stored_checkpoint(fs, str(root), 3)
    (root / "state" / "rank1.safetensors").write_bytes(b"short")
    with pytest.raises(CheckpointIncomplete, match=r"rank1.safetensors is 5 bytes in storage; rank wrote 64 bytes"):
        verify_stored_checkpoint(fs, str(root), 2)
    (root / "state" / "rank1.safetensors").write_bytes(bytes([1]) * 64)
    (root / "model" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointIncomplete, match=r"model-00002-of-00002.safetensors is missing in storage"):
        verify_stored_checkpoint(fs, str(root), 2)


def test_a_stored_checkpoint_on_s3_is_verified_without_download(s3_bucket, tmp_path):
    from convllava.io.storage import s3_filesystem, upload_dir

    _checkpoint(tmp_path / "ck", 2, sharded=False)
    upload_dir(tmp_path / "ck", f"s3://{s3_bucket}/runs/ck")
    fs = s3_filesystem()
    assert verify_stored_checkpoint(fs, f"{s3_bucket}/runs/ck", 2)["step"] == 7
    with pytest.raises(CheckpointIncomplete, match="no COMPLETE.rank2.json"):
        verify_stored_checkpoint(fs, f"{s3_bucket}/runs/ck", 3)


def test_the_gpu_checks_tokenizer_has_vicunas_image_id(tmp_path):
    """The GPU check trains the convllava-768 preset (image_token_id 32000) without a hub download: its tokenizer
    is the tiny one with Vicuna's id layout, which the processor accepts and which tokenizes text as the tiny one."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_train_check import vicuna_shaped_tokenizer

    from convllava.modeling.config import ConvLlavaConfig
    from convllava.processing.processor import ConvLlavaProcessor
    from convllava.processing.tokenizer import load_tokenizer

    directory = vicuna_shaped_tokenizer(tmp_path / "tok")
    processor = ConvLlavaProcessor.for_model(ConvLlavaConfig.from_preset("convllava-768"), str(directory))
    assert processor.image_token_id == 32000 and len(processor.tokenizer) == 32001
    text = "USER: <image>\nHow many cats sit on the 12 mats? ASSISTANT: Two."
    ours, tiny = processor.tokenizer(text).input_ids, load_tokenizer("tiny")(text).input_ids
    assert ours == [32000 if t == 4 else t for t in tiny] and ours.count(32000) == 1

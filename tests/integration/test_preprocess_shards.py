"""The Ray Data preprocessing pipeline on a local Ray instance: shards hold everything training needs, square
PNG shards carry the released models' pixels, llava tokenization the released models' tokens."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from preprocess_harness import good_set, rec, rows, run, save
from transformers import CLIPImageProcessorPil

from convllava.data import collate
from convllava.image_processing import ConvLlavaImageProcessor, load_image

pytestmark = pytest.mark.integration


def test_shards_hold_everything_training_needs(ray_local, tmp_path, tiny_processor):
    root = tmp_path / "data"
    manifest = run(root, good_set(root), tmp_path / "out")
    assert (manifest["read"], manifest["written"], manifest["quarantined"]) == (7, 7, 0)
    assert manifest["buckets"] == {"128x512": 1, "192x320": 2, "256x256": 1, "320x192": 2, "text": 1}
    assert sum(manifest["buckets"].values()) == sum(s["rows"] for s in manifest["shards"]) == 7
    assert manifest["padded_pixel_fraction"] < 0.15  # a 16-token budget has coarse buckets; bench/ measures 768+
    assert sum(manifest["token_length_histogram"]["counts"]) == 7
    assert (tmp_path / "out/buckets.png").read_bytes()[:4] == b"\x89PNG"
    for row in rows(tmp_path / "out"):
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        assert row["input_ids"].count(tiny_processor.image_token_id) == row["num_image_tokens"]
        if row["bucket"] == "text":
            assert row["image"] is None and row["num_image_tokens"] == 0
            continue
        image = Image.open(io.BytesIO(row["image"]))
        assert f"{image.height}x{image.width}" == row["bucket"]
        assert row["num_image_tokens"] == (image.height // 64) * (image.width // 64)
        learned = tiny_processor.tokenizer.decode([t for t in row["labels"] if t != -100])
        assert learned == " A red square.</s>"
    # The encoded images are stored as they are (compressing JPEG/PNG again costs CPU and saves nothing); the rest zstd
    import pyarrow.parquet as pq

    for shard in manifest["shards"]:
        meta = pq.ParquetFile(tmp_path / "out" / shard["path"]).metadata.row_group(0)
        codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
        assert codecs.pop("image") == "UNCOMPRESSED" and set(codecs.values()) == {"ZSTD"}, codecs


def llava_pad_reference(image: Image.Image, resolution: int) -> torch.Tensor:
    """The released models' pixels: LLaVA's expand2square (fill int(mean·255), floored centring), then the PIL
    CLIP processor (see tests/unit/test_image_processing.py, which checks `square` mode against it in memory)."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}
    )
    (w, h), side = image.size, max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return torch.from_numpy(np.asarray(processor.preprocess(square)["pixel_values"][0]))


def test_square_png_shards_carry_the_released_models_pixels(ray_local, tmp_path, photos):
    root = tmp_path / "data"
    chosen = {p.name: p.path for p in photos if p.name in ("coffee", "chelsea", "rocket")}  # 600x400, 451x300, 640x427
    (root / "img").mkdir(parents=True)
    records = [
        rec(name, Path(shutil.copy(path, root / "img")).relative_to(root).as_posix()) for name, path in chosen.items()
    ]
    tall = load_image(chosen["chelsea"]).crop((40, 0, 373, 300)).resize((333, 517))  # odd sides, 1:1.55
    records.append(rec("tall", save(root, "img/tall.png", tall)))
    manifest = run(root, records, tmp_path / "out", mode="square", image_format="png")
    assert manifest["written"] == 4 and manifest["buckets"] == {"256x256": 4}
    shard_rows = sorted(rows(tmp_path / "out"), key=lambda r: r["id"])
    pixels = collate(shard_rows, pad_token_id=0)["pixel_values"]  # what training reads: (4, 3, 256, 256)
    proc = ConvLlavaImageProcessor(resolution=256, mode="square")
    for row, x in zip(shard_rows, pixels, strict=True):
        original = load_image(root / next(r["image"] for r in records if r["id"] == row["id"]))
        diff = (x - llava_pad_reference(original, 256)).abs().max().item()
        assert diff <= 1 / 255, f"{row['id']}: max |shard - reference| = {diff:.4f} (normalised)"
        p = proc.target(*original.size)  # content_box: where the content lies in the 256x256 frame
        assert row["content_box"] == [p.offset_x, p.offset_y, p.content_width, p.content_height]
        assert (row["orig_width"], row["orig_height"]) == original.size


def test_llava_tokenization_shards_hold_the_released_models_tokens(ray_local, tmp_path, vicuna_tokenizer_dir):
    from convllava.processor import ConvLlavaProcessor
    from convllava.processor_config import ProcessorConfig
    from convllava.tokenizer import load_tokenizer

    root = tmp_path / "data"
    records = good_set(root, n=2)
    manifest = run(root, records, tmp_path / "out", tokenizer=str(vicuna_tokenizer_dir), tokenization="llava")
    assert manifest["written"] == 3 and manifest["config"]["tokenization"] == "llava"
    proc = ConvLlavaProcessor(
        load_tokenizer(vicuna_tokenizer_dir), ProcessorConfig(max_length=256, tokenization="llava")
    )
    dummy = proc.tokenizer.convert_tokens_to_ids("▁")
    by_id = {r["id"]: r for r in records}
    for row in rows(tmp_path / "out"):
        sizes = [] if row["bucket"] == "text" else [tuple(map(int, row["bucket"].split("x")))]
        want = proc.tokenize(by_id[row["id"]]["conversations"], sizes)
        assert (row["input_ids"], row["labels"]) == (want.input_ids, want.labels)
        if sizes:  # "<image>\nWhat …": the dummy-prefix ▁ right after the visual tokens
            after = row["input_ids"].index(proc.image_token_id) + row["num_image_tokens"]
            assert row["input_ids"][after] == dummy and row["labels"][after] == -100

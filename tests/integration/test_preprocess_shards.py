"""The Ray Data preprocessing pipeline on a local Ray instance: shards hold everything training needs, units' part
files merge into shard files of the configured size, square PNG shards carry the released models' pixels, llava
tokenization the released models' tokens."""

from __future__ import annotations

import hashlib
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from preprocess_harness import good_set, rec, rows, run, save
from transformers import CLIPImageProcessorPil

from convllava.data.epochs import collate
from convllava.data.shards import read_index
from convllava.io.storage import Store
from convllava.processing.image_processing import ConvLlavaImageProcessor, load_image
from pipelines.worker import part_aggregates

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
    for shard in manifest["shards"]:
        meta = pq.ParquetFile(tmp_path / "out" / shard["path"]).metadata.row_group(0)
        codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
        assert codecs.pop("image") == "UNCOMPRESSED" and set(codecs.values()) == {"ZSTD"}, codecs


def _tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("shards/*/*.parquet")}


def _index(out: Path) -> list[dict]:
    return list(read_index(Store(str(out))).values())


def _unit_parts(index: list[dict], unit_size: int) -> list[tuple[str, int]]:
    """(bucket, rows) of each part file the work units write, unit by unit: units are the key-sorted samples cut as
    evenly as possible into at most `unit_size`, and a unit writes one part per bucket it touches."""
    keys = sorted(e["key"] for e in index)
    count = -(-len(keys) // unit_size)
    bounds = [round(i * len(keys) / count) for i in range(count + 1)]
    bucket_of = {e["key"]: e["bucket"] for e in index}
    units = [[bucket_of[k] for k in keys[bounds[i] : bounds[i + 1]]] for i in range(count)]
    return [(b, unit.count(b)) for unit in units for b in sorted(set(unit))]


def _greedy_files(parts: list[tuple[str, int]], shard_rows: int) -> dict[str, list[int]]:
    """Rows of each shard file per bucket, in key order, as the merge phase cuts them: consecutive parts of a bucket
    merge while their rows fit. The images here are a few kB, so `shard_bytes` never decides."""
    files: dict[str, list[int]] = {}
    for bucket, n in parts:
        runs = files.setdefault(bucket, [])
        if runs and runs[-1] + n <= shard_rows:
            runs[-1] += n
        else:
            runs.append(n)
    return files


def test_units_parts_merge_into_shard_files_of_the_configured_size(ray_local, tmp_path):
    root, out = tmp_path / "data", tmp_path / "one"
    records = good_set(root, n=40)  # 41 samples in 5 buckets
    sizes = dict(unit_size=4, shard_rows=10, row_group_rows=3)
    manifest = run(root, records, out, workers=1, **sizes)
    index = _index(out)
    assert manifest["reconciled"] and manifest["written"] + manifest["quarantined"] == manifest["read"] == 41
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["written"] == 41
    referenced = sorted({e["shard"] for e in index if e["status"] == "written"})
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("shards/*/*.parquet"))
    assert on_disk == referenced == sorted(s["path"] for s in manifest["shards"])  # no part left over

    found: dict[str, list[tuple[str, int]]] = {}
    for shard in manifest["shards"]:
        file = pq.ParquetFile(out / shard["path"])
        table = file.read(columns=["key", "bucket"])
        keys = table.column("key").to_pylist()
        assert file.metadata.num_rows == shard["rows"] <= 10, shard
        assert set(table.column("bucket").to_pylist()) == {shard["bucket"]}, shard
        assert keys == sorted(keys), shard
        groups = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
        assert max(groups) <= 3 and sum(groups) == shard["rows"], (shard, groups)
        found.setdefault(shard["bucket"], []).append((keys[0], shard["rows"]))
    parts = _unit_parts(index, unit_size=4)
    expected = _greedy_files(parts, shard_rows=10)
    assert {b: [n for _, n in sorted(files)] for b, files in found.items()} == expected
    assert len(manifest["shards"]) == sum(map(len, expected.values())) < len(parts)

    # The same input on two actors: the same files, byte for byte.
    run(root, records, tmp_path / "two", workers=2, **sizes)
    before = _tree(out)
    assert _tree(tmp_path / "two") == before

    # A few more records: every earlier file stays as it is, the new samples go into new files.
    mtimes = {p: (out / p).stat().st_mtime_ns for p in before}
    added = [rec(f"new{i}", save(root, f"img/new{i}.jpg", Image.new("RGB", (320, 160), (i, 9, 250)))) for i in range(3)]
    again = run(root, [*records, *added], out, workers=2, **sizes)
    assert again["run"]["processed"] == 3 and again["run"]["reused"] == 41 and again["written"] == 44
    after = _tree(out)
    assert {p: after.get(p) for p in before} == before
    assert all((out / p).stat().st_mtime_ns == mtimes[p] for p in before)
    new_ids = [r["id"] for p in set(after) - set(before) for r in pq.read_table(out / p).to_pylist()]
    assert sorted(new_ids) == ["new0", "new1", "new2"]


class _Killed(BaseException):
    """The driver dying between the merges and the index (a signal, a lost node)."""


def test_a_run_that_dies_after_its_merges_is_recovered(ray_local, tmp_path, monkeypatch):
    import pipelines.preprocess

    root, out = tmp_path / "data", tmp_path / "out"
    records = good_set(root, n=40)
    sizes = dict(unit_size=4, shard_rows=10)
    reference = run(root, records, tmp_path / "reference", **sizes)

    def die(*_):
        raise _Killed

    with monkeypatch.context() as m:
        m.setattr(pipelines.preprocess, "_manifest", die)
        with pytest.raises(_Killed):
            run(root, records, out, **sizes)
    left = set(_tree(out))
    assert left > set(_tree(tmp_path / "reference"))  # the merged files and the parts they merged
    again = run(root, records, out, **sizes)
    assert again["run"]["resumed"] == 41 and again["run"]["processed"] == 0
    assert again["reconciled"] and again["written"] == reference["written"] == 41
    ids = [r["id"] for r in rows(out)]
    assert sorted(ids) == sorted(r["id"] for r in records)  # every sample once
    on_disk = sorted(str(p.relative_to(out)) for p in out.glob("shards/*/*.parquet"))
    assert on_disk == sorted(s["path"] for s in again["shards"])


def test_a_failed_merge_keeps_its_parts(ray_local, tmp_path, monkeypatch, caplog):
    import pipelines.preprocess

    root, out = tmp_path / "data", tmp_path / "out"
    records = good_set(root, n=12)
    merge_groups = pipelines.preprocess._merge_groups

    def one_bad(*args):  # the first merge also names a part that is not there: its task fails reading it
        groups = merge_groups(*args)
        bucket, parts = groups[0]
        return [(bucket, [*parts, f"shards/bucket={bucket}/part-gone.parquet"]), *groups[1:]]

    monkeypatch.setattr(pipelines.preprocess, "_merge_groups", one_bad)
    manifest = run(root, records, out, unit_size=2)
    # The failed merge's bucket keeps its parts (valid files, only smaller); every other bucket is one file.
    [(bucket, parts)] = merge_groups(part_aggregates(_index(out)), dict.fromkeys(_tree(out), 1), 10_000, 1 << 30)
    files = Counter(s["bucket"] for s in manifest["shards"])
    assert files == {**dict.fromkeys(files, 1), bucket: len(parts)} and len(parts) > 1
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(_tree(out))  # nothing else on disk
    warning = next(r.getMessage() for r in caplog.records if "keeping them" in r.getMessage())
    assert f"bucket {bucket}: merging {len(parts) + 1} part files" in warning and all(p in warning for p in parts)
    assert manifest["reconciled"] and manifest["written"] == 13 and len(rows(out)) == 13


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
    from convllava.processing.processor import ConvLlavaProcessor
    from convllava.processing.processor_config import ProcessorConfig
    from convllava.processing.tokenizer import load_tokenizer

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

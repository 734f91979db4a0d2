"""The training data path: epoch plans (buckets, global batch, ranks, determinism, length grouping), the
text-padding metric, collate, and ShardSet on real preprocessing output (local and S3)."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convllava.data.epochs import collate, plan_epoch
from convllava.processing.labels import IGNORE_INDEX

# ---------------------------------------------------------------------------------------------------- ShardSet
IMAGE_SIZES = {"wide": (320, 160), "tall": (160, 320), "square": (256, 256)}  # (W, H) → 192x320, 320x192, 256x256
PER_SHAPE = 7
TEXT_ONLY = 3

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, ray_local) -> Path:
    """A real preprocessing output: 21 images in three buckets + 3 text-only samples, several shard files per bucket."""
    from pipelines.config import Mixture, PreprocessConfig, Source
    from pipelines.preprocess import run_preprocess

    root = tmp_path_factory.mktemp("shardset")
    (root / "img").mkdir()
    records = []
    for shape, (w, h) in IMAGE_SIZES.items():
        for i in range(PER_SHAPE):
            Image.new("RGB", (w, h), (20 * i, 90, 200)).save(root / "img" / f"{shape}{i}.png")
            answer = " ".join(["word"] * (1 + 5 * i))  # varied lengths
            records.append(
                {
                    "id": f"{shape}{i}",
                    "image": f"img/{shape}{i}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is it?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    for i in range(TEXT_ONLY):
        records.append(
            {
                "id": f"text{i}",
                "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello " * (i + 1)}],
            }
        )
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mixture = Mixture(sources=(Source(name="data", annotations=str(root / "data.jsonl"), image_root=str(root)),))
    # Small files (4 rows) of small row groups (2 rows): buckets span several shard files, files several row groups.
    config = PreprocessConfig(
        resolution=256, max_length=512, unit_size=5, shard_rows=4, row_group_rows=2, image_format="png"
    )
    run_preprocess(mixture, config, str(root / "out"), echo=lambda *_: None)
    return root / "out"


def test_shardset_indexes_real_shards(shards_dir):
    from convllava.data.shards import ShardSet

    manifest = json.loads((shards_dir / "manifest.json").read_text())
    shards = ShardSet(str(shards_dir), cache_pieces=2)
    assert manifest["written"] == len(shards) == 3 * PER_SHAPE + TEXT_ONLY == 24
    assert manifest["buckets"] == {"192x320": 7, "256x256": 7, "320x192": 7, "text": 3}
    assert dict(Counter(info.bucket for info in shards.infos)) == manifest["buckets"]
    assert len(shards.shards) == len(manifest["shards"]) > 4  # several files per bucket
    assert shards.shards == [s["path"] for s in manifest["shards"]]
    assert shards.fingerprint == ShardSet(str(shards_dir)).fingerprint
    assert shards.fingerprint.startswith(manifest["config_hash"] + "-")
    assert shards.num_image_tokens.tolist() == [
        {"192x320": 15, "320x192": 15, "256x256": 16, "text": 0}[i.bucket] for i in shards.infos
    ]

    # Sample i is row r of shard s in manifest order, rows in file order.
    path, r = shards.location(len(shards) - 1)
    assert (path, r) == (manifest["shards"][-1]["path"], manifest["shards"][-1]["rows"] - 1)
    everything = shards.rows(range(len(shards)))
    assert [x["key"] for x in everything] == shards.keys.to_pylist()
    assert [(x["bucket"], len(x["input_ids"])) for x in everything] == [(i.bucket, i.length) for i in shards.infos]
    assert len(shards._cache) == 2  # LRU bounded by cache_pieces

    plan = plan_epoch(shards.infos, micro_batch_size=2, grad_accum=1, world_size=2, seed=0, epoch=0)
    # 7 → 3 micro-batches per image bucket (1 dropped each), text 3 → 1 (1 dropped): 10 micro-batches, 5 steps.
    assert (plan.num_steps, plan.dropped) == (5, 4)
    seen = 0
    for rank in range(2):
        for _, micro in plan.rank_steps(rank):
            for mb in micro:
                rows = shards.rows(mb)
                assert [x["key"] for x in rows] == [shards.keys[i].as_py() for i in mb]
                batch = collate(rows, pad_token_id=0)
                bucket = rows[0]["bucket"]
                if bucket == "text":
                    assert batch["pixel_values"] is None
                else:
                    h, w = (int(v) for v in bucket.split("x"))
                    assert batch["pixel_values"].shape == (2, 3, h, w)
                    assert batch["stats"]["num_visual_tokens"] == 2 * (h // 64) * (w // 64)
                assert batch["input_ids"].shape == (2, max(shards.infos[i].length for i in mb))
                assert batch["stats"]["num_label_tokens"] == sum(
                    sum(label != IGNORE_INDEX for label in x["labels"]) for x in rows
                )
                seen += 2
    assert seen == plan.num_samples == 20

    # A data-loader worker gets a copy without the cached tables, and it still reads rows.
    clone = pickle.loads(pickle.dumps(shards))
    assert len(clone._cache) == 0 and clone.rows([0, 5])[1]["key"] == shards.keys[5].as_py()


def test_rank_loader_reads_each_row_group_once_and_gives_the_planned_rows(shards_dir):
    import pyarrow.parquet as pq

    from convllava.data.epochs import plan_shard_epoch
    from convllava.data.loader import RankLoader
    from convllava.data.shards import ShardSet

    shards = ShardSet(str(shards_dir))
    files = [pq.ParquetFile(shards_dir / path).metadata for path in shards.shards]
    assert shards.num_pieces == sum(md.num_row_groups for md in files) > len(files)  # files of several row groups
    assert all(md.row_group(i).num_rows <= 2 for md in files for i in range(md.num_row_groups))
    assert shards.layout.piece_starts.tolist() == [
        0,
        *np.cumsum([md.row_group(i).num_rows for md in files for i in range(md.num_row_groups)]).tolist(),
    ]
    for world_size in (1, 2):
        plan = plan_shard_epoch(
            shards.layout, micro_batch_size=2, grad_accum=1, world_size=world_size, seed=0, epoch=0, window=2
        )
        pieces_read = 0
        for rank in range(world_size):
            loader = RankLoader(shards, plan, rank, prefetch=2, threads=2)
            got = list(loader)
            assert [step for step, _ in got] == list(range(plan.num_steps))
            for step, micro in got:
                planned = plan.micro_batches(rank, step)
                assert [[r["key"] for r in mb] for mb in micro] == [
                    [shards.keys[i].as_py() for i in mb] for mb in planned
                ]
                assert all(len({r["bucket"] for r in mb}) == 1 for mb in micro)
            # Each row group the rank needs is read once; it holds at most the window, the carry and the prefetch.
            needed = np.unique(shards.layout.piece_of(plan.batches[:, :, rank, :].ravel()))
            assert loader.stats.pieces_read == len(needed) == len(loader.order)
            assert loader.stats.max_in_flight <= 2
            pieces_read += loader.stats.pieces_read
        # The ranks' shares meet inside at most world_size - 1 row groups, which both ranks read.
        assert pieces_read <= shards.num_pieces + world_size - 1

        resumed = list(RankLoader(shards, plan, 0, start_step=plan.num_steps - 1))
        assert [step for step, _ in resumed] == [plan.num_steps - 1]
        assert [[r["key"] for r in mb] for mb in resumed[0][1]] == [
            [shards.keys[i].as_py() for i in mb] for mb in plan.micro_batches(0, plan.num_steps - 1)
        ]


def test_shardset_refuses_unusable_outputs(shards_dir, tmp_path):
    from convllava.data.shards import ShardSet, ShardSetError

    with pytest.raises(ShardSetError, match="manifest.json not found: this is not a finished preprocessing output"):
        ShardSet(str(tmp_path / "nothing"))
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "reconciled": False}))
    with pytest.raises(ShardSetError, match=r"reconciled is false \(24 written \+ 0 quarantined != 24 read\)"):
        ShardSet(str(copy))
    first = manifest["shards"][0]
    wrong = [{**first, "rows": first["rows"] + 1}, *manifest["shards"][1:]]
    (copy / "manifest.json").write_text(json.dumps({**manifest, "shards": wrong}))
    with pytest.raises(ShardSetError, match=f"manifest says {first['rows'] + 1} rows of bucket"):
        ShardSet(str(copy))
    with pytest.raises(IndexError, match="out of range for 24 samples"):
        ShardSet(str(shards_dir)).rows([0, 24])


def test_manifest_reads_and_writes_the_same_json(shards_dir, tmp_path):
    from convllava.data.shards import MANIFEST, Manifest, ManifestError
    from convllava.io.storage import Store

    written = (shards_dir / MANIFEST).read_text()
    manifest = Manifest.load(str(shards_dir))
    assert manifest.to_json() == written  # the file preprocess wrote, byte for byte
    assert (manifest.written, manifest.sources["data"].written, manifest.run.processed) == (24, 24, 24)
    assert [s.bucket for s in manifest.shards].count("text") >= 1 and manifest.config.unit_size == 5
    assert manifest.profile()["rows_per_bucket"] == manifest.buckets
    manifest.save(Store(str(tmp_path)))
    assert (tmp_path / MANIFEST).read_text() == written
    (tmp_path / MANIFEST).write_text(json.dumps({k: v for k, v in json.loads(written).items() if k != "run"}))
    with pytest.raises(ManifestError, match=r"manifest.json: not a preprocessing manifest \(missing \['run'\]"):
        Manifest.load(str(tmp_path))
    assert Manifest.find(str(tmp_path)) is None and Manifest.find(str(tmp_path / "absent")) is None


def test_shardset_reads_from_s3(shards_dir, s3_bucket):
    import boto3

    from convllava.data.shards import ShardSet

    client = boto3.client("s3")
    for path in sorted(p for p in shards_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"shards/{path.relative_to(shards_dir).as_posix()}")
    local, remote = ShardSet(str(shards_dir)), ShardSet(f"s3://{s3_bucket}/shards/")
    assert remote.infos == local.infos and remote.keys.equals(local.keys) and remote.fingerprint == local.fingerprint
    picked = [3, 17, 0, 23]
    assert [x["content_hash"] for x in remote.rows(picked)] == [x["content_hash"] for x in local.rows(picked)]

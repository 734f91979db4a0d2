"""Training input from S3 at the scale that matters: what a stage fetches, counted at the HTTP layer (a proxy in
front of moto's server), and the per-sample index a process pays when it opens a shard set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reliability.faultproxy import FaultProxy

from convllava.data.epochs import plan_shard_epoch
from convllava.data.shards import SHARD_SCHEMA, ShardSet, write_shard
from convllava.io.storage import Store, upload_dir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TINY_STAGE1 = ROOT / "jobs" / "configs" / "tiny" / "stage1.yaml"


def relayout(src, dest, row_group_rows: int) -> None:
    """A copy of a preprocessing output whose shard files are cut into row groups of `row_group_rows` rows (the same
    rows, file names and manifest)."""
    store = Store(str(dest))
    for path in sorted(src.rglob("*")):
        if path.is_file():
            rel = path.relative_to(src).as_posix()
            if rel.startswith("shards/"):
                write_shard(store, rel, pq.read_table(path), row_group_rows=row_group_rows)
            else:
                store.write_bytes(rel, path.read_bytes())


def test_a_stage_from_s3_fetches_its_shards_about_once_per_epoch(shards, s3_server, s3_bucket, tmp_path, monkeypatch):
    relayout(shards, tmp_path / "data", row_group_rows=8)
    upload_dir(tmp_path / "data", f"s3://{s3_bucket}/data")
    opened = ShardSet(f"s3://{s3_bucket}/data")
    shard_bytes = int(opened.file_bytes.sum())
    assert opened.num_pieces >= 3 * len(opened.shards)  # files of several row groups: reads can be partial

    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        ShardSet(f"s3://{s3_bucket}/data")  # what opening the index costs: footers and light columns
        open_bytes, open_gets = proxy.body_bytes("GET", f"/{s3_bucket}/data/shards/")
        proxy.transfers.clear()
        # `convllava train --local` in a process of its own (its gloo group must not outlive it in this one)
        overrides = [f"data=s3://{s3_bucket}/data", "epochs=1", "checkpoint_every=0", "shuffle_window=4"]
        command = [sys.executable, "-m", "jobs.cli", "train", "--local", "--config", str(TINY_STAGE1)]
        out = subprocess.run(
            [*command, "--workdir", str(tmp_path), *overrides], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        fetched, gets = proxy.body_bytes("GET", f"/{s3_bucket}/data/shards/")
    (final,) = (tmp_path / "runs" / "stage1").glob("checkpoint_*")
    steps = json.loads((final / "trainer_state.json").read_text())["step"]

    plan = plan_shard_epoch(opened.layout, micro_batch_size=4, grad_accum=4, world_size=1, seed=0, epoch=0, window=4)
    assert steps == plan.num_steps >= len(opened) // 16 - 2  # one whole epoch
    # Everything the stage fetched of the shard files (the memory plan and the rank each open the index; the epoch
    # reads each row group once, and each file's footer) against the files' size: the old reader fetched ~60x.
    ratio = fetched / shard_bytes
    print(
        f"fetched {fetched:,d} bytes of {shard_bytes:,d} in shard files ({ratio:.3f}x) in {gets} GETs; "
        f"an open: {open_bytes:,d} bytes in {open_gets} GETs; {opened.num_pieces} row groups in {len(opened.shards)} files"
    )
    assert 1.0 <= ratio <= 1.25
    assert open_bytes < 0.1 * shard_bytes
    # The opens (driver and rank), then about one GET per row group and two per footer (its length, its bytes).
    assert gets <= 3 * open_gets + opened.num_pieces + 2 * len(opened.shards)


def test_the_index_costs_under_100_bytes_per_sample(tmp_path):
    """At 200,000 samples (text-only rows with 40-character keys, the light columns the index reads): the index
    arrays, and the resident memory one process gains by opening the set."""
    import gc

    import psutil

    from convllava.data.shards import Manifest, ShardFile

    n, per_file = 200_000, 10_000
    store = Store(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    shards = []
    for f in range(n // per_file):
        keys = [f"instruct/{f:05d}-{i:07d}-abcdefghijklmnopq" for i in range(per_file)]
        lengths = rng.integers(40, 2048, per_file)
        table = pa.table(
            {
                **{field.name: pa.nulls(per_file, field.type) for field in SHARD_SCHEMA},
                "key": keys,
                "bucket": ["text"] * per_file,
                "length": lengths.astype(np.int32),
                "num_image_tokens": np.zeros(per_file, dtype=np.int32),
            },
            schema=SHARD_SCHEMA,
        )
        path = f"shards/bucket=text/part-{f:05d}.parquet"
        write_shard(store, path, table)
        shards.append(ShardFile(path, "text", per_file))
    manifest = Manifest.from_dict(
        {
            **{k: None for k in Manifest.__dataclass_fields__},
            "config": {},  # the defaults
            "read": n,
            "written": n,
            "quarantined": 0,
            "reconciled": True,
            "shards": [s.__dict__ for s in shards],
            "sources": {},
            "run": {"processed": n, "reused": 0, "removed": 0, "resumed": 0, "seconds": 0.0},
        }
    )
    manifest.save(store)

    gc.collect()
    before = psutil.Process().memory_info().rss
    opened = ShardSet(str(tmp_path / "out"))
    gc.collect()
    pa.default_memory_pool().release_unused()
    grown = psutil.Process().memory_info().rss - before
    assert len(opened) == n
    per_sample = opened.index_nbytes / n
    print(f"index {per_sample:.1f} bytes/sample; process grew {grown / n:.1f} bytes/sample")
    assert per_sample <= 100
    assert grown / n <= 150  # the arrays, plus allocator slack; the Python-object index took ~450

"""Training input at paper scale: one rank's epoch from S3, against a plain scan and against the old reader.

Data: `--shards` shard files of `--rows` rows each (one bucket per file: 256x256, 192x320, 320x192 and a few text-only
files), real JPEG images at bucket size, token lengths as in caption + instruct data (one in five long), row groups of
`--row-group-rows` rows, written with `convllava.data.shards.write_shard` and uploaded to moto's S3 server on 127.0.0.1.
Every S3 request goes through a proxy that counts response bytes (tests/reliability/faultproxy.py); moto and the
proxy run in processes of their own, as a real endpoint would.

Measured, for rank 0 of `--world-size` ranks (plan: `plan_shard_epoch`, micro-batch 4, grad_accum 2, window 16):
- bytes: what its `RankLoader` fetches over one epoch, against the bytes of the row groups its share covers and
  against the whole files it touches; also what opening the index costs. The old reader (a global shuffle,
  `plan_epoch`, and whole files through an 8-file LRU) is replayed from the file sizes for the same rank.
- throughput: decode + collate of every micro-batch (no model), against a plain sequential pyarrow scan of the same
  files from the same endpoint (`ParquetFile.iter_batches`, rows decoded and collated in file order). The two run
  alternately, `--repeats` times each; the best of each is compared.
- index memory at `--index-samples` (2M) samples, in fresh processes: `ShardSet.index_nbytes` and the resident
  memory opening the set adds, against the old index (SampleInfo objects, a list of keys, two int arrays).
- padding: text padding per micro-batch of the shard-aware plan against the global plan (`plan_epoch`), both length-
  grouped, on the benchmark data and on preprocessed demo shards where earlier runs left them (`PADDING_DATA`).

    .venv/bin/python bench/loader.py [--out bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from _common import wait_quiet

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
DEFAULT_OUT = REPO / "bench" / "results" / "loader.json"
# Real preprocessed demo data for the padding comparison, where earlier runs left it (bench/train_step.py, make demo).
PADDING_DATA = {
    "train_step_mix": REPO / "work" / "bench-train" / "shards-mix",
    "demo_captions": REPO / "work" / "demo" / "shards" / "captions",
    "demo_instruct": REPO / "work" / "demo" / "shards" / "instruct",
}
BUCKETS = ("256x256", "192x320", "320x192")
SIZES = {"micro_batch_size": 4, "grad_accum": 2}
WINDOW = 16
GOALS = {"bytes_ratio": 1.25, "throughput_ratio": 0.8, "index_bytes_per_sample": 100, "padding_points": 1.0}


def images(bucket: str, count: int, rng: np.random.Generator) -> list[bytes]:
    """`count` distinct JPEGs of the bucket's size: gradients, shapes and noise (compress like photos, not flat)."""
    from PIL import Image, ImageDraw

    h, w = (int(v) for v in bucket.split("x"))
    out = []
    for _ in range(count):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * rng.uniform(0.2, 1)) % 256, (y * rng.uniform(0.2, 1)) % 256, (x + y) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            draw.ellipse(
                (x0, y0, x0 + rng.integers(10, 80), y0 + rng.integers(10, 80)), fill=tuple(rng.integers(0, 255, 3))
            )
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_manifest(store, files: list) -> None:
    """A manifest listing `files` (ShardFile), every sample written: what ShardSet needs to open synthetic shards."""
    from convllava.data.shards import Manifest

    n = sum(f.rows for f in files)
    Manifest.from_dict(
        {
            **{k: None for k in Manifest.__dataclass_fields__},
            "config": {},  # the defaults
            "read": n,
            "written": n,
            "quarantined": 0,
            "reconciled": True,
            "shards": [f.__dict__ for f in files],
            "sources": {},
            "run": {"processed": n, "reused": 0, "removed": 0, "resumed": 0, "seconds": 0.0},
        }
    ).save(store)


def build(root: Path, shards: int, rows: int, row_group_rows: int, seed: int = 0) -> dict[str, Any]:
    """Shard files + manifest under `root` (local); returns sizes."""
    import pyarrow as pa

    from convllava.data.shards import SHARD_SCHEMA, ShardFile, Store, write_shard
    from convllava.processing.buckets import num_visual_tokens

    rng = np.random.default_rng(seed)
    store = Store(str(root))
    pool = {b: images(b, 64, rng) for b in BUCKETS}
    files = []
    for f in range(shards):
        bucket = "text" if f % 8 == 7 else BUCKETS[f % 3]
        long = rng.random(rows) < 0.2
        lengths = np.where(long, rng.integers(600, 1500, rows), rng.integers(40, 120, rows)).astype(np.int32)
        tokens = 0 if bucket == "text" else num_visual_tokens(*(int(v) for v in bucket.split("x")))
        table = pa.table(
            {
                **{field.name: pa.nulls(rows, field.type) for field in SHARD_SCHEMA},
                "key": [f"bench/{f:04d}-{i:06d}" for i in range(rows)],
                "bucket": [bucket] * rows,
                "image": pa.nulls(rows, pa.binary())
                if bucket == "text"
                else [pool[bucket][int(i)] for i in rng.integers(0, 64, rows)],
                "input_ids": [list(range(5, 5 + int(k))) for k in lengths],
                "labels": [[-100] * (int(k) // 2) + list(range(int(k) - int(k) // 2)) for k in lengths],
                "num_image_tokens": np.full(rows, tokens, dtype=np.int32),
                "length": lengths,
            },
            schema=SHARD_SCHEMA,
        )
        path = f"shards/bucket={bucket}/part-{f:05d}.parquet"
        write_shard(store, path, table, row_group_rows=row_group_rows)
        files.append(ShardFile(path, bucket, rows))
    write_manifest(store, files)
    sizes = [(root / s.path).stat().st_size for s in files]
    return {
        "files": len(files),
        "rows_per_file": rows,
        "row_group_rows": row_group_rows,
        "samples": sum(f.rows for f in files),
        "file_mib": [round(min(sizes) / 2**20, 2), round(max(sizes) / 2**20, 2)],
        "total_mib": round(sum(sizes) / 2**20, 1),
    }


# ------------------------------------------------------------------------------------ S3 endpoint (other processes)
def _serve_moto(port_conn) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port_conn.send(server._server.server_address[1])
    port_conn.recv()  # until told to stop
    server.stop()


def _serve_proxy(upstream: str, conn) -> None:
    from reliability.faultproxy import FaultProxy

    with FaultProxy(upstream) as proxy:
        conn.send(proxy.endpoint)
        while (command := conn.recv()) != "stop":
            if command == "clear":
                with proxy.lock:
                    proxy.transfers.clear()
                conn.send(None)
            else:
                conn.send(proxy.body_bytes(*command))


class Endpoint:
    """moto's S3 server and the byte-counting proxy in front of it, each in a process of its own: like a real
    endpoint, their Python threads do not share this process's GIL with the loader being measured."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._moto, moto_end = ctx.Pipe()
        self._proxy, proxy_end = ctx.Pipe()
        self.processes = [ctx.Process(target=_serve_moto, args=(moto_end,), daemon=True)]
        self.processes[0].start()
        self.upstream = f"http://127.0.0.1:{self._moto.recv()}"
        self.processes.append(ctx.Process(target=_serve_proxy, args=(self.upstream, proxy_end), daemon=True))
        self.processes[1].start()
        self.endpoint = self._proxy.recv()

    def clear(self) -> None:
        self._proxy.send("clear")
        self._proxy.recv()

    def body_bytes(self, method: str, path: str) -> tuple[int, int]:
        self._proxy.send((method, path))
        return self._proxy.recv()

    def stop(self) -> None:
        self._proxy.send("stop")
        self._moto.send("stop")
        for process in self.processes:
            process.join(timeout=30)


def rank_loader_pass(shards, plan, rank: int) -> tuple[float, int]:
    """Seconds and samples for rank `rank`'s epoch: read (RankLoader), decode and collate every micro-batch."""
    from convllava.data.epochs import collate
    from convllava.data.loader import RankLoader

    start, samples = time.perf_counter(), 0
    for _, micro in RankLoader(shards, plan, rank, prefetch=4, threads=4):
        for rows in micro:
            collate(rows, pad_token_id=0)
            samples += len(rows)
    return time.perf_counter() - start, samples


def plain_scan_pass(uri: str, paths: list[str], batch: int) -> tuple[float, int]:
    """Seconds and samples for a sequential pyarrow scan of `paths`, decoding and collating `batch` rows at a time."""
    import pyarrow.parquet as pq

    from convllava.data.epochs import collate
    from convllava.io.storage import Store

    store = Store(uri)
    start, samples = time.perf_counter(), 0
    for path in paths:
        with store.fs.open_input_file(store.path(path)) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch):
                rows = record_batch.to_pylist()
                for i in range(0, len(rows) - batch + 1, batch):
                    collate(rows[i : i + batch], pad_token_id=0)
                    samples += batch
    return time.perf_counter() - start, samples


def old_reader_bytes(shards, world_size: int, rank: int, cache_files: int = 8) -> int:
    """Bytes the old reader fetched for `rank`'s epoch: the global-shuffle plan, each micro-batch's files read whole
    through an LRU of `cache_files` decoded files (what ShardSet.rows did before row groups)."""
    from convllava.data.epochs import plan_epoch

    plan = plan_epoch(shards.infos, **SIZES, world_size=world_size, seed=0, epoch=0)
    shard_of = shards.layout.piece_shard[shards.layout.piece_of(np.arange(len(shards)))]
    cache: OrderedDict[int, None] = OrderedDict()
    fetched = 0
    for step in range(plan.num_steps):
        for mb in plan.micro_batches(rank, step):
            for f in sorted(set(shard_of[mb].tolist()), key=list(shard_of[mb]).index):
                if f in cache:
                    cache.move_to_end(f)
                    continue
                fetched += int(shards.file_bytes[f])
                cache[f] = None
                while len(cache) > cache_files:
                    cache.popitem(last=False)
    return fetched


def share_bytes(shards, plan, rank: int) -> tuple[int, int, list[str]]:
    """(bytes of the row groups rank's share covers, bytes of the files it touches, those files)."""
    from convllava.data.shards import read_footer

    pieces = np.unique(shards.layout.piece_of(plan.batches[:, :, rank, :].ravel()))
    files = sorted(set(shards.layout.piece_shard[pieces].tolist()))
    groups = 0
    for f in files:
        with shards.store.fs.open_input_file(shards.store.path(shards.shards[f])) as handle:
            md = read_footer(handle)
        first = int(shards.layout.shard_pieces[f])
        for p in pieces[shards.layout.piece_shard[pieces] == f].tolist():
            rg = md.row_group(p - first)
            groups += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
    return groups, int(shards.file_bytes[files].sum()), [shards.shards[f] for f in files]


# --------------------------------------------------------------------------------------------- index memory (child)
def index_child(kind: str, root: str) -> dict[str, Any]:
    """In a fresh process: the resident memory opening `root` adds, the new index or the old one."""
    import psutil
    import pyarrow as pa

    from convllava.data.shards import ShardSet

    gc.collect()
    before = psutil.Process().memory_info().rss
    if kind == "new":
        opened = ShardSet(root)
        n, nbytes = len(opened), opened.index_nbytes
    else:  # the old index: what ShardSet held before (SampleInfo per sample, keys as a list, two int arrays)
        from convllava.data.epochs import SampleInfo
        from convllava.io.storage import Store

        store, infos, keys, shard_of, row_of = Store(root), [], [], [], []
        opened = ShardSet(root)  # only for its file list; dropped below
        paths = list(opened.shards)
        del opened
        for i, path in enumerate(paths):
            t = store.read_table(path, columns=["key", "bucket", "length", "num_image_tokens"])
            infos.extend(
                SampleInfo(b, n)
                for b, n in zip(t.column("bucket").to_pylist(), t.column("length").to_pylist(), strict=True)
            )
            keys.extend(t.column("key").to_pylist())
            shard_of.append(np.full(t.num_rows, i, dtype=np.int32))
            row_of.append(np.arange(t.num_rows, dtype=np.int64))
        tokens = np.asarray([0] * len(infos), dtype=np.int64)
        held = (infos, keys, np.concatenate(shard_of), np.concatenate(row_of), tokens)
        n, nbytes = len(infos), None
    gc.collect()
    pa.default_memory_pool().release_unused()
    grown = psutil.Process().memory_info().rss - before
    if kind == "old":
        del held
    return {
        "samples": n,
        "rss_bytes_per_sample": round(grown / n, 1),
        "index_bytes_per_sample": None if nbytes is None else round(nbytes / n, 1),
    }


def index_memory(samples: int, work: Path) -> dict[str, Any]:
    import pyarrow as pa

    from convllava.data.shards import SHARD_SCHEMA, ShardFile, Store, write_shard

    per_file = 10_000
    store, files = Store(str(work)), []
    rng = np.random.default_rng(0)
    for f in range(samples // per_file):
        table = pa.table(
            {
                **{field.name: pa.nulls(per_file, field.type) for field in SHARD_SCHEMA},
                # keys as preprocessing makes them: `source/id`, ids of ShareGPT4V-like length
                "key": [f"sharegpt4v_pt/sa_{f:04d}{i:06d}-{i % 7}" for i in range(per_file)],
                "bucket": [BUCKETS[f % 3]] * per_file,
                "length": rng.integers(40, 2048, per_file).astype(np.int32),
                "num_image_tokens": np.full(per_file, 16, dtype=np.int32),
            },
            schema=SHARD_SCHEMA,
        )
        path = f"shards/bucket={BUCKETS[f % 3]}/part-{f:05d}.parquet"
        write_shard(store, path, table)
        files.append(ShardFile(path, BUCKETS[f % 3], per_file))
    write_manifest(store, files)
    out = {}
    for kind in ("old", "new"):
        proc = subprocess.run(
            [sys.executable, __file__, "--index-child", kind, str(work)], capture_output=True, text=True, check=True
        )
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio_rss"] = round(out["new"]["rss_bytes_per_sample"] / out["old"]["rss_bytes_per_sample"], 3)
    return out


# --------------------------------------------------------------------------------------------------------- padding
def padding(layout, world_size: int) -> dict[str, float]:
    from convllava.data.epochs import plan_epoch, plan_shard_epoch

    infos = layout.infos()
    shard, whole = [], []
    for epoch in range(3):
        shard.append(
            plan_shard_epoch(layout, **SIZES, world_size=world_size, seed=0, epoch=epoch, window=WINDOW)
            .padding_fractions(layout.lengths)
            .mean()
        )
        whole.append(
            plan_epoch(infos, **SIZES, world_size=world_size, seed=0, epoch=epoch)
            .padding_fractions(layout.lengths)
            .mean()
        )
    return {
        "samples": len(infos),
        "shard_plan": round(float(np.mean(shard)), 4),
        "global_plan": round(float(np.mean(whole)), 4),
        "points": round(100 * float(np.mean(shard) - np.mean(whole)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--row-group-rows", type=int, default=128)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--index-samples", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--index-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_child:
        print(json.dumps(index_child(*args.index_child)))
        return

    import boto3

    from convllava.data.epochs import plan_shard_epoch
    from convllava.data.shards import ShardSet
    from convllava.io.storage import upload_dir

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    result["idle_wait"] = wait_quiet(120, 0.3)
    result["load1_start"] = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        result["data"] = build(work / "data", args.shards, args.rows, args.row_group_rows)
        endpoint = Endpoint()
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint.upstream,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client("s3").create_bucket(Bucket="bench-loader")
        uri = "s3://bench-loader/data"
        upload_dir(work / "data", uri)
        result["data"]["build_s"] = round(time.perf_counter() - t, 1)
        os.environ["AWS_ENDPOINT_URL"] = endpoint.endpoint  # from here on, every request is counted
        shards_path = "/bench-loader/data/shards/"
        try:
            endpoint.clear()
            shards = ShardSet(uri)
            opened, open_gets = endpoint.body_bytes("GET", shards_path)
            plan = plan_shard_epoch(shards.layout, **SIZES, world_size=args.world_size, seed=0, epoch=0, window=WINDOW)
            groups, files_bytes, files = share_bytes(shards, plan, 0)
            passes: dict[str, list] = {"loader": [], "scan": []}
            for r in range(args.repeats):
                for kind in ("scan", "loader") if r % 2 == 0 else ("loader", "scan"):
                    gc.collect()
                    load = os.getloadavg()[0]
                    if kind == "loader":
                        fresh = ShardSet(uri)  # a process's first epoch: no footer cached
                        endpoint.clear()
                        seconds, samples = rank_loader_pass(fresh, plan, 0)
                    else:
                        endpoint.clear()
                        seconds, samples = plain_scan_pass(uri, files, SIZES["micro_batch_size"])
                    fetched, gets = endpoint.body_bytes("GET", shards_path)
                    passes[kind].append(
                        {
                            "seconds": round(seconds, 3),
                            "samples": samples,
                            "samples_per_s": round(samples / seconds, 1),
                            "bytes": fetched,
                            "gets": gets,
                            "load1": load,
                        }
                    )
        finally:
            endpoint.stop()
        best = {k: max(v, key=lambda p: p["samples_per_s"]) for k, v in passes.items()}
        result["rank0"] = {
            "world_size": args.world_size,
            "plan": {**SIZES, "window": WINDOW, "steps": plan.num_steps, "dropped": plan.dropped},
            "share_row_group_bytes": groups,
            "share_file_bytes": files_bytes,
            "files_touched": len(files),
            "open_index": {
                "bytes": opened,
                "gets": open_gets,
                "of_all_files": round(opened / int(shards.file_bytes.sum()), 4),
            },
            "passes": passes,
            "bytes_ratio_to_row_groups": round(best["loader"]["bytes"] / groups, 3),
            "bytes_ratio_to_files": round(best["loader"]["bytes"] / files_bytes, 3),
            "old_reader_bytes": old_reader_bytes(shards, args.world_size, 0),
            "throughput_ratio": round(best["loader"]["samples_per_s"] / best["scan"]["samples_per_s"], 3),
        }
        result["rank0"]["old_reader_ratio_to_files"] = round(result["rank0"]["old_reader_bytes"] / files_bytes, 2)
        result["padding"] = {"bench_data": padding(shards.layout, args.world_size)}
        for name, path in PADDING_DATA.items():
            if (path / "manifest.json").is_file():  # bench/train_step.py's geometry: 2 ranks
                result["padding"][name] = padding(ShardSet(str(path)).layout, 2)
        result["index_memory"] = index_memory(args.index_samples, work / "index")
    result["load1_end"] = os.getloadavg()[0]
    r0, mem = result["rank0"], result["index_memory"]
    result["goals"] = {
        "bytes_ratio": {"measured": r0["bytes_ratio_to_files"], "goal": f"<= {GOALS['bytes_ratio']}"},
        "throughput_ratio": {"measured": r0["throughput_ratio"], "goal": f">= {GOALS['throughput_ratio']}"},
        "index_bytes_per_sample": {
            "measured": mem["new"]["rss_bytes_per_sample"],
            "goal": f"<= {GOALS['index_bytes_per_sample']}",
        },
        "padding_points": {
            "measured": {name: p["points"] for name, p in result["padding"].items()},
            "goal": f"within {GOALS['padding_points']}",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main()

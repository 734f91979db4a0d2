"""ShardSet: the preprocessing output (local directory or `s3://` prefix) as an indexed, random-access data set.

Opening reads `manifest.json` and only the light columns of every shard it lists (the planner needs buckets and
lengths, not images), so every rank can build the same `infos` list and the same epoch plan cheaply. Sample i is
row r of shard file s in manifest order, rows in file order. Full rows (images included) are fetched on demand,
a whole shard file at a time (a file is one Parquet row group), through a small LRU cache of decoded tables.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from convllava.data import SampleInfo
from pipelines.preprocess import MANIFEST
from pipelines.store import OutputStore

LIGHT_COLUMNS = ("key", "bucket", "length", "num_image_tokens")


class ShardSetError(ValueError):
    """The preprocessing output cannot be trained on; the message says why and what to run."""


class ShardSet:
    """Random access to the samples of one preprocessing output.

    Attributes:
        manifest: the parsed manifest.json.
        infos: one SampleInfo (bucket, length) per sample, in sample-index order.
        keys: each sample's key (`source/id`, as in index.jsonl), for error messages and audits.
        num_image_tokens: (N,) visual tokens per sample (token budgets without reading images).
        shards: shard paths (relative to the output root), in manifest order.
    """

    def __init__(self, uri: str, cache_files: int = 8, read_threads: int = 16) -> None:
        """Open the output at `uri` (local directory or `s3://` prefix).

        Args:
            cache_files: decoded shard tables kept in memory for `rows`.
            read_threads: parallel reads of the light columns when opening (S3 latency dominates there).

        Raises:
            ShardSetError: no manifest (preprocess never finished), an unreconciled manifest, or shards that do
                not match the manifest (the output changed after the manifest was written).
        """
        if cache_files < 1:
            raise ValueError(f"cache_files must be >= 1, got {cache_files}")
        self.uri = uri.rstrip("/")
        self.store = OutputStore(self.uri)
        self.cache_files = cache_files
        raw = self.store.read_bytes(MANIFEST)
        if raw is None:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST} not found: this is not a finished preprocessing output; "
                f"run `convllava preprocess ... --output {self.uri}` first"
            )
        self.manifest: dict[str, Any] = json.loads(raw)
        if not self.manifest.get("reconciled"):
            raise ShardSetError(
                f"{self.uri}/{MANIFEST}: reconciled is false ({self.manifest.get('written')} written + "
                f"{self.manifest.get('quarantined')} quarantined != {self.manifest.get('read')} read); "
                "the output is incomplete, re-run preprocess on it"
            )
        self.shards: list[str] = [s["path"] for s in self.manifest["shards"]]

        with ThreadPoolExecutor(max_workers=max(1, min(read_threads, len(self.shards)))) as pool:
            tables = list(pool.map(self._read_light, self.shards))  # map keeps manifest order
        infos: list[SampleInfo] = []
        shard_of, row_of = [], []
        for i, (entry, table) in enumerate(zip(self.manifest["shards"], tables, strict=True)):
            buckets = table.column("bucket").to_pylist()
            if table.num_rows != entry["rows"] or set(buckets) - {entry["bucket"]}:
                raise ShardSetError(
                    f"{self.uri}/{entry['path']}: manifest says {entry['rows']} rows of bucket {entry['bucket']!r}, "
                    f"the file has {table.num_rows} rows of bucket(s) {sorted(set(buckets))}; the output changed "
                    "after its manifest was written, re-run preprocess"
                )
            infos.extend(SampleInfo(b, n) for b, n in zip(buckets, table.column("length").to_pylist(), strict=True))
            shard_of.append(np.full(table.num_rows, i, dtype=np.int32))
            row_of.append(np.arange(table.num_rows, dtype=np.int64))
        self.infos = infos
        self.keys: list[str] = [k for t in tables for k in t.column("key").to_pylist()]
        self.num_image_tokens = np.asarray(
            [n for t in tables for n in t.column("num_image_tokens").to_pylist()], dtype=np.int64
        )
        self._shard_of = np.concatenate(shard_of) if tables else np.empty(0, dtype=np.int32)
        self._row_of = np.concatenate(row_of) if tables else np.empty(0, dtype=np.int64)
        if len(infos) != self.manifest["written"]:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST}: {self.manifest['written']} samples written but its shards hold "
                f"{len(infos)} rows; re-run preprocess"
            )
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def _read_light(self, path: str) -> pa.Table:
        # OutputStore.read_table reads every column (images included); read only the planner's columns here.
        return pq.read_table(f"{self.store.root}/{path}", columns=list(LIGHT_COLUMNS), filesystem=self.store.fs)

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def fingerprint(self) -> str:
        """Identity of the sample index space: the manifest's input_fingerprint and config_hash plus its shard list.

        The shard list is included because identical inputs and config can be laid out in different shard files
        (unit_size is not in config_hash, incremental runs rewrite some shards), and a layout change renumbers
        the samples, which would make a resumed epoch plan point at other samples.
        """
        return manifest_fingerprint(self.manifest)

    def location(self, index: int) -> tuple[str, int]:
        """(shard path, row in that file) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        return self.shards[self._shard_of[index]], int(self._row_of[index])

    def _table(self, shard: int) -> pa.Table:
        table = self._cache.get(shard)
        if table is None:
            table = self.store.read_table(self.shards[shard])
            self._cache[shard] = table
            while len(self._cache) > self.cache_files:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shard)
        return table

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Full shard rows (all SHARD_SCHEMA columns) of these samples, in the order given."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"sample index(es) {bad[:5]} out of range for {len(self)} samples")
        by_shard: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            by_shard.setdefault(int(self._shard_of[i]), []).append(pos)
        out: list[dict[str, Any] | None] = [None] * len(indices)
        for shard, positions in by_shard.items():  # one file read (or cache hit) per shard touched
            taken = self._table(shard).take(pa.array([self._row_of[indices[p]] for p in positions], pa.int64()))
            for p, row in zip(positions, taken.to_pylist(), strict=True):
                out[p] = row
        return out  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        # Loader worker processes get the index, not the cached tables (which may be hundreds of MB).
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"ShardSet({self.uri!r}, samples={len(self)}, shards={len(self.shards)})"


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """`ShardSet.fingerprint` from the manifest alone (what a driver can afford to read)."""
    layout = json.dumps([[s["path"], s["rows"]] for s in manifest["shards"]])
    text = f"{manifest['input_fingerprint']}\n{manifest['config_hash']}\n{layout}"
    return f"{manifest['config_hash']}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def dataset_profile(manifest: dict[str, Any]) -> dict[str, Any]:
    """The counts a tracking UI shows for a shard set: samples, shards, visual tokens, per-bucket rows."""
    buckets: dict[str, int] = {}
    for entry in manifest["shards"]:
        buckets[entry["bucket"]] = buckets.get(entry["bucket"], 0) + entry["rows"]
    return {"num_rows": manifest["written"], "read": manifest["read"], "quarantined": manifest["quarantined"],
            "shards": len(manifest["shards"]), "visual_tokens": manifest.get("visual_tokens"),
            "rows_per_bucket": buckets}  # fmt: skip


def read_manifest(uri: str) -> dict[str, Any] | None:
    """A shard folder's manifest (local or `s3://`), None when there is none (yet)."""
    raw = OutputStore(uri.rstrip("/")).read_bytes(MANIFEST)
    return None if raw is None else json.loads(raw)

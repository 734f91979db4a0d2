"""The shard format: what preprocessing writes and training reads, in one place.

A preprocessing output (local directory or `s3://` prefix) holds
- `shards/bucket=HxW/part-<hash>.parquet`: one Parquet file per resolution bucket and work unit, rows of
  `SHARD_SCHEMA` sorted by key, named by the hash of their rows' content hashes (identical input, identical files);
- `index.jsonl`: one entry per sample read, `written` (with its shard) or `quarantined` (with a reason);
- `quarantine.jsonl`: the quarantined samples' records and reasons;
- `manifest.json`: the `Manifest`, written last, so that its presence means a finished output.

`ShardSet` opens such an output as an indexed, random-access data set: it reads the manifest and only the light
columns of every shard it lists (the planner needs buckets and lengths, not images), so every rank builds the same
`infos` list and the same epoch plan cheaply. Sample i is row r of shard file s in manifest order, rows in file
order. Full rows (images included) are fetched on demand, a whole shard file at a time (a file is one Parquet row
group), through a small LRU cache of decoded tables.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from convllava.data import SampleInfo
from convllava.storage import Store

INDEX, QUARANTINE, MANIFEST = "index.jsonl", "quarantine.jsonl", "manifest.json"
SHARDS_DIR = "shards"
TEXT_BUCKET = "text"  # the bucket of samples without an image

SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int32()),
        ("bucket", pa.string()),
        ("image", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_width", pa.int32()),
        # x, y, w, h of the image inside the padded canvas (square mode: rounded; the edges are resampled)
        ("content_box", pa.list_(pa.int32())),
        ("padded_fraction", pa.float32()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_image_tokens", pa.int32()),
        ("length", pa.int32()),
        ("num_label_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("content_hash", pa.string()),
    ]
)
LIGHT_COLUMNS = ("key", "bucket", "length", "num_image_tokens")  # what the planner reads
# An index entry copies ENTRY_KEYS from its shard row and derives the rest from ENTRY_COLUMNS (`written_entry`).
ENTRY_KEYS = ("key", "id", "source", "line", "content_hash", "bucket", "length", "num_image_tokens")
ENTRY_COLUMNS = (*ENTRY_KEYS, "padded_fraction", "orig_width", "orig_height", "height", "width")
QUARANTINE_FIELDS = ("id", "source", "line", "category", "reason", "record")  # a quarantine.jsonl row


# ------------------------------------------------------------------------------------------------ shards and index


def shard_path(bucket: str, content_hashes: list[str]) -> str:
    digest = hashlib.sha256("".join(sorted(content_hashes)).encode()).hexdigest()[:20]
    return f"{SHARDS_DIR}/bucket={bucket}/part-{digest}.parquet"


def shard_bucket(path: str) -> str:
    """The bucket of a shard file, from its path."""
    return path.split("bucket=")[1].split("/")[0]


def write_shard(store: Store, path: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    # No dictionary pages whose layout depends on writer state: identical rows → identical bytes. The encoded images
    # (JPEG/PNG) are compressed already: zstd on them costs CPU here and on every read in training, and saves nothing.
    pq.write_table(table, sink, compression=_codecs(table.schema), use_dictionary=False)
    store.write_bytes(path, sink.getvalue().to_pybytes())


@functools.cache
def _codecs(schema: pa.Schema) -> dict[str, str]:
    """Parquet's codec per leaf column (`input_ids.list.element`): none for `image`, zstd for the rest."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    paths = [leaves.column(i).path for i in range(len(leaves))]
    return {path: "none" if path == "image" else "zstd" for path in paths}


def write_shards(store: Store, rows: list[dict[str, Any]]) -> dict[str, str]:
    """One shard file per bucket, rows sorted by key; returns key → shard path (relative to the store)."""
    by_bucket: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_bucket.setdefault(r["bucket"], []).append(r)
    shard_of = {}
    for bucket, group in sorted(by_bucket.items()):
        group.sort(key=lambda r: r["key"])
        path = shard_path(bucket, [r["content_hash"] for r in group])
        write_shard(store, path, pa.Table.from_pylist(group, schema=SHARD_SCHEMA))
        shard_of.update({r["key"]: path for r in group})
    return shard_of


def written_entry(row: dict[str, Any]) -> dict[str, Any]:
    """The index entry of a written sample, from its shard row (only ENTRY_COLUMNS are read)."""
    return {
        **{k: row[k] for k in ENTRY_KEYS},
        "status": "written",
        "padded_fraction": row["padded_fraction"],
        "orig_aspect": row["orig_width"] / row["orig_height"] if row["orig_height"] else None,
        "pixels": row["height"] * row["width"],
    }


def read_index(store: Store) -> dict[str, dict[str, Any]]:
    """key → index entry of the output's `index.jsonl`; {} when there is none."""
    data = store.read_bytes(INDEX)
    if data is None:
        return {}
    entries = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return {e["key"]: e for e in entries}


def write_index(store: Store, entries: list[dict[str, Any]]) -> None:
    store.write_text(INDEX, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def write_quarantine(store: Store, entries: list[dict[str, Any]]) -> None:
    """`quarantine.jsonl` from the quarantined index entries, in the order given."""
    rows = ({k: e.get(k) for k in QUARANTINE_FIELDS} for e in entries)
    store.write_text(QUARANTINE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# -------------------------------------------------------------------------------------------------------- manifest


class ManifestError(ValueError):
    """A manifest.json that is not a preprocessing manifest."""


@dataclass
class SourceCounts:
    available: int
    read: int
    written: int = 0
    quarantined: int = 0


@dataclass
class ShardFile:
    path: str  # relative to the output root
    bucket: str
    rows: int


@dataclass
class RunCounts:
    """What the run that wrote the manifest did."""

    processed: int
    reused: int
    removed: int
    resumed: int
    seconds: float


@dataclass
class Manifest:
    """`manifest.json`: the counts, provenance and shard list of one preprocessing output.

    `written + quarantined == read` when `reconciled`; `config` is the PreprocessConfig's `to_dict()`.
    """

    read: int
    written: int
    quarantined: int
    reconciled: bool
    quarantine_fraction: float
    buckets: dict[str, int]
    sources: dict[str, SourceCounts]
    quarantine_reasons: dict[str, int]
    input_fingerprint: str
    config: dict[str, Any]
    config_hash: str
    code_version: str
    padded_pixel_fraction: float
    token_length_histogram: dict[str, list[int]]
    visual_tokens: int
    shards: list[ShardFile]
    run: RunCounts
    mean_length: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        """Raises ManifestError naming `where` and the fields that are missing or unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
        if missing or unknown:
            raise ManifestError(
                f"{where}: not a preprocessing manifest (missing {missing}, unknown {unknown}); "
                "re-run preprocess on this output"
            )
        typed = {
            "sources": {name: SourceCounts(**counts) for name, counts in data["sources"].items()},
            "shards": [ShardFile(**s) for s in data["shards"]],
            "run": RunCounts(**data["run"]),
        }
        return cls(**{**data, **typed})

    @classmethod
    def find(cls, location: str | Store) -> Manifest | None:
        """`load`, or None when there is no manifest (yet) or it is not one."""
        try:
            return cls.load(location)
        except (FileNotFoundError, ManifestError):
            return None

    @classmethod
    def load(cls, location: str | Store) -> Manifest:
        """The manifest of the output at `location` (local directory, `s3://` prefix or a Store).

        Raises:
            FileNotFoundError: the output has no manifest (preprocessing never finished there).
            ManifestError: the file is not a preprocessing manifest.
        """
        store = location if isinstance(location, Store) else Store(location)
        raw = store.read_bytes(MANIFEST)
        if raw is None:
            raise FileNotFoundError(f"{store.uri}/{MANIFEST} not found")
        return cls.from_dict(json.loads(raw), f"{store.uri}/{MANIFEST}")

    def save(self, store: Store) -> None:
        store.write_text(MANIFEST, self.to_json())

    @property
    def fingerprint(self) -> str:
        """Identity of the sample index space: input_fingerprint and config_hash plus the shard list.

        The shard list is included because identical inputs and config can be laid out in different shard files
        (unit_size is not in config_hash, incremental runs rewrite some shards), and a layout change renumbers
        the samples, which would make a resumed epoch plan point at other samples.
        """
        layout = json.dumps([[s.path, s.rows] for s in self.shards])
        text = f"{self.input_fingerprint}\n{self.config_hash}\n{layout}"
        return f"{self.config_hash}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"

    def input_profile(self) -> dict[str, Any]:
        """The counts a tracking UI shows for the raw input: samples read, and per source."""
        return {"read": self.read, "sources": {name: dataclasses.asdict(c) for name, c in self.sources.items()}}

    def profile(self) -> dict[str, Any]:
        """The counts a tracking UI shows for a shard set: samples, shards, visual tokens, per-bucket rows."""
        buckets: dict[str, int] = {}
        for s in self.shards:
            buckets[s.bucket] = buckets.get(s.bucket, 0) + s.rows
        return {
            "num_rows": self.written,
            "read": self.read,
            "quarantined": self.quarantined,
            "shards": len(self.shards),
            "visual_tokens": self.visual_tokens,
            "rows_per_bucket": buckets,
        }


# -------------------------------------------------------------------------------------------------------- reader


class ShardSetError(ValueError):
    """The preprocessing output cannot be trained on; the message says why and what to run."""


class ShardSet:
    """Random access to the samples of one preprocessing output.

    Attributes:
        manifest: the output's Manifest.
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
        self.store = Store(self.uri)
        self.cache_files = cache_files
        try:
            self.manifest = Manifest.load(self.store)
        except FileNotFoundError:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST} not found: this is not a finished preprocessing output; "
                f"run `convllava preprocess ... --output {self.uri}` first"
            ) from None
        m = self.manifest
        if not m.reconciled:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST}: reconciled is false ({m.written} written + {m.quarantined} quarantined != "
                f"{m.read} read); the output is incomplete, re-run preprocess on it"
            )
        self.shards: list[str] = [s.path for s in m.shards]

        with ThreadPoolExecutor(max_workers=max(1, min(read_threads, len(self.shards)))) as pool:
            tables = list(pool.map(self._read_light, self.shards))  # map keeps manifest order
        infos: list[SampleInfo] = []
        shard_of, row_of = [], []
        for i, (entry, table) in enumerate(zip(m.shards, tables, strict=True)):
            buckets = table.column("bucket").to_pylist()
            if table.num_rows != entry.rows or set(buckets) - {entry.bucket}:
                raise ShardSetError(
                    f"{self.uri}/{entry.path}: manifest says {entry.rows} rows of bucket {entry.bucket!r}, "
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
        if len(infos) != m.written:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST}: {m.written} samples written but its shards hold {len(infos)} rows; "
                "re-run preprocess"
            )
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def _read_light(self, path: str) -> pa.Table:
        return self.store.read_table(path, columns=list(LIGHT_COLUMNS))

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def fingerprint(self) -> str:
        """`Manifest.fingerprint`: what a resumed epoch plan checks it still indexes the same samples by."""
        return self.manifest.fingerprint

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

"""The shard format: what preprocessing writes and training reads, in one place.

A preprocessing output (local directory or `s3://` prefix) holds
- `shards/bucket=HxW/part-<hash>.parquet`: Parquet files of one resolution bucket each (up to SHARD_ROWS rows /
  SHARD_BYTES, in row groups of up to ROW_GROUP_ROWS rows / ROW_GROUP_BYTES of images), rows of `SHARD_SCHEMA`
  sorted by key, named by the hash of their rows' content hashes (identical input, identical files);
- `index/<version>/part-NNNNN-of-PPPPP.parquet`: the index, one entry (`INDEX_SCHEMA`) per sample read, `written`
  (with its shard) or `quarantined` (with a reason), hash-partitioned by sample key (`pipelines.partition`); the
  manifest names the version, so a new index takes effect with the manifest that points at it;
- `quarantine/part-NNNNN.jsonl`: the quarantined samples' records and reasons, by (source, line) in each part;
- `manifest.json`: the `Manifest`, written last, so that its presence means a finished output.

`ShardSet` opens such an output as a compact index: it reads the manifest and only the light columns and footer of
every shard (the planner needs buckets, lengths and row-group boundaries, not images), so every rank builds the same
`layout` (numpy columns, ~30 bytes per sample with the keys) and the same epoch plan cheaply. Sample i is row r of
shard file s in manifest order, rows in file order. Full rows (images included) are read a row group at a time:
`RankLoader` (convllava.data.loader) reads each row group a rank's plan needs once, ahead of the steps; `rows` gives
random access through a small cache of row groups.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convllava.data.epochs import SampleInfo, ShardLayout
from convllava.data.preprocess_config import ROW_GROUP_BYTES, ROW_GROUP_ROWS, PreprocessConfig
from convllava.io.config import ConfigLoadError
from convllava.io.storage import Store

INDEX_DIR, QUARANTINE, MANIFEST = "index", "quarantine", "manifest.json"
SHARDS_DIR = "shards"
TEXT_BUCKET = "text"  # the bucket of samples without an image
FOOTER_CACHE = 8  # shard footers (Parquet metadata) a reader keeps: the files its current window reads

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
QUARANTINE_FIELDS = ("id", "source", "line", "category", "reason", "record")  # a quarantine/ row
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("content_hash", pa.string()),
        ("status", pa.string()),  # written | quarantined
        ("shard", pa.string()),
        ("bucket", pa.string()),
        ("length", pa.int32()),
        ("num_image_tokens", pa.int32()),
        ("padded_fraction", pa.float64()),
        ("orig_aspect", pa.float64()),
        ("pixels", pa.int64()),
        ("category", pa.string()),
        ("reason", pa.string()),
        ("record", pa.string()),
    ]
)


# ------------------------------------------------------------------------------------------------ shards and index


def shard_path(bucket: str, content_hashes: list[str]) -> str:
    digest = hashlib.sha256("".join(sorted(content_hashes)).encode()).hexdigest()[:20]
    return f"{SHARDS_DIR}/bucket={bucket}/part-{digest}.parquet"


def shard_bucket(path: str) -> str:
    """The bucket of a shard file, from its path."""
    return path.split("bucket=")[1].split("/")[0]


def row_group_bounds(
    image_bytes: Sequence[int] | np.ndarray, max_rows: int = ROW_GROUP_ROWS, max_bytes: int = ROW_GROUP_BYTES
) -> list[int]:
    """Row offsets [0, ..., n] cutting rows with these image sizes into row groups of at most `max_rows` rows and,
    past the first row of a group, at most `max_bytes` image bytes (one larger image makes a group of its own).

    >>> row_group_bounds([10, 10, 10, 10, 10], max_rows=4, max_bytes=25)
    [0, 2, 4, 5]
    """
    bounds, rows, size = [0], 0, 0
    for i, n in enumerate(np.asarray(image_bytes, dtype=np.int64).tolist()):
        if rows and (rows == max_rows or size + n > max_bytes):
            bounds.append(i)
            rows, size = 0, 0
        rows, size = rows + 1, size + n
    if rows:
        bounds.append(bounds[-1] + rows)
    return bounds


def write_shard(
    store: Store,
    path: str,
    table: pa.Table,
    row_group_rows: int = ROW_GROUP_ROWS,
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> None:
    """Write `table` as one Parquet file of row groups cut by `row_group_bounds` (the unit a training rank reads in one
    request). The same rows give the same bytes."""
    sink = pa.BufferOutputStream()
    sizes = pc.fill_null(pc.binary_length(table.column("image")), 0).to_numpy(zero_copy_only=False)
    bounds = row_group_bounds(sizes, row_group_rows, row_group_bytes)
    # No dictionary pages whose layout depends on writer state: identical rows → identical bytes. The encoded images
    # (JPEG/PNG) are compressed already: zstd on them costs CPU here and on every read in training, and saves nothing.
    # No statistics either: nothing filters on them, and they would make every footer a rank reads larger.
    with pq.ParquetWriter(
        sink, table.schema, compression=_codecs(table.schema), use_dictionary=False, write_statistics=False
    ) as writer:
        for start, stop in itertools.pairwise(bounds):
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
        if table.num_rows == 0:
            writer.write_table(table)
    store.write_bytes(path, sink.getvalue().to_pybytes())


def write_parquet(store: Store, path: str, table: pa.Table) -> None:
    """A plain zstd Parquet file (the index, preprocessing's work files)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    store.write_bytes(path, sink.getvalue().to_pybytes())


@functools.cache
def _codecs(schema: pa.Schema) -> dict[str, str]:
    """Parquet's codec per leaf column (`input_ids.list.element`): none for `image`, zstd for the rest."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    paths = [leaves.column(i).path for i in range(len(leaves))]
    return {path: "none" if path == "image" else "zstd" for path in paths}


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
    """key → index entry of the output's finished index (all of it in memory: for tools and tests on small outputs;
    the pipeline reads it a partition at a time); {} when there is none."""
    manifest = Manifest.find(store)
    if manifest is None:
        return {}
    entries = [e for p in store.list_files(manifest.index) for e in store.read_table(p).to_pylist()]
    return {e["key"]: e for e in entries}


def read_quarantine(store: Store) -> list[dict[str, Any]]:
    """The rows of every `quarantine/` part, in part order."""
    data = (store.read_bytes(p) or b"" for p in store.list_files(QUARANTINE))
    return [json.loads(line) for chunk in data for line in chunk.decode().splitlines() if line.strip()]


def quarantine_text(entries: list[dict[str, Any]]) -> str:
    """A `quarantine/` part from quarantined index entries, in the order given."""
    rows = ({k: e.get(k) for k in QUARANTINE_FIELDS} for e in entries)
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


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

    `written + quarantined == read` when `reconciled`; `config` is the PreprocessConfig that made the output (plain
    data only in the file).
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
    config: PreprocessConfig
    config_hash: str
    code_version: str
    padded_pixel_fraction: float
    token_length_histogram: dict[str, list[int]]
    visual_tokens: int
    shards: list[ShardFile]
    run: RunCounts
    mean_length: float
    index: str  # the index version's folder (`index/<version>`)
    index_partitions: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "config": self.config.to_dict()}

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
        try:
            config = PreprocessConfig.from_dict(data["config"], f"{where}: config")
        except ConfigLoadError as e:
            raise ManifestError(f"{e}; re-run preprocess on this output") from None
        typed = {
            "config": config,
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


def read_footer(f: pa.NativeFile) -> pq.FileMetaData:
    """A Parquet file's metadata in two exact reads (its length, then the footer). pyarrow's own reader fetches the
    last 64 KiB whatever the footer's size: on S3 that is most of a small row group's bytes again."""
    size = f.size()
    tail = f.read_at(8, size - 8)
    if size < 12 or tail[4:] != b"PAR1":
        raise OSError(f"not a Parquet file ({size} bytes, no PAR1 footer)")
    length = int.from_bytes(tail[:4], "little")
    if length > size - 12:
        raise OSError(f"Parquet footer of {length} bytes in a file of {size}")
    footer = f.read_at(length, size - 8 - length)
    return pq.ParquetFile(pa.BufferReader(b"PAR1" + footer + tail)).metadata


class ShardSetError(ValueError):
    """The preprocessing output cannot be trained on; the message says why and what to run."""


class ShardSet:
    """The samples of one preprocessing output: a compact index, row-group reads, and random access.

    Sample i is row r of shard file s in manifest order, rows in file order; each row group of each file is a
    contiguous range of samples (a *piece*, the unit training reads in one request; `layout`).

    Attributes:
        manifest: the output's Manifest.
        shards: shard paths (relative to the output root), in manifest order.
        layout: the compact index the planner reads (`convllava.data.epochs.ShardLayout`: bucket codes, lengths, row-group
            boundaries as numpy arrays).
        num_image_tokens: (N,) int32 visual tokens per sample (token budgets without reading images).
        keys: (N,) each sample's key (`source/id`, as in index.jsonl) as one Arrow string array.
        file_bytes: (F,) the size of each shard file.
    """

    def __init__(self, uri: str, cache_pieces: int = 8, read_threads: int = 16) -> None:
        """Open the output at `uri` (local directory or `s3://` prefix): the manifest, then the light columns and the
        footer of every shard (in `read_threads` parallel reads: S3 latency dominates there).

        Args:
            cache_pieces: decoded row groups `rows` keeps (random access; a training loader reads each once).

        Raises:
            ShardSetError: no manifest (preprocess never finished), an unreconciled manifest, or shards that do
                not match the manifest (the output changed after the manifest was written).
        """
        if cache_pieces < 1:
            raise ValueError(f"cache_pieces must be >= 1, got {cache_pieces}")
        self.uri = uri.rstrip("/")
        self.store = Store(self.uri)
        self.cache_pieces = cache_pieces
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
        names = tuple(sorted({s.bucket for s in m.shards}))
        code = {b: i for i, b in enumerate(names)}
        buckets, lengths, tokens, keys, groups, sizes = [], [], [], [], [], []
        with ThreadPoolExecutor(max_workers=max(1, min(read_threads, len(self.shards)))) as pool:
            for entry, (table, group_rows, size) in zip(
                m.shards, pool.map(self._read_light, self.shards), strict=True
            ):  # map keeps manifest order
                found = pc.unique(table.column("bucket")).to_pylist()
                if table.num_rows != entry.rows or set(found) - {entry.bucket}:
                    raise ShardSetError(
                        f"{self.uri}/{entry.path}: manifest says {entry.rows} rows of bucket {entry.bucket!r}, "
                        f"the file has {table.num_rows} rows of bucket(s) {sorted(found)}; the output changed "
                        "after its manifest was written, re-run preprocess"
                    )
                buckets.append(np.full(table.num_rows, code[entry.bucket], dtype=np.int16))
                lengths.append(table.column("length").to_numpy().astype(np.int32))
                tokens.append(table.column("num_image_tokens").to_numpy().astype(np.int32))
                keys.append(table.column("key").combine_chunks())
                groups.append(group_rows)
                sizes.append(size)
        if sum(len(b) for b in buckets) != m.written:
            raise ShardSetError(
                f"{self.uri}/{MANIFEST}: {m.written} samples written but its shards hold "
                f"{sum(len(b) for b in buckets)} rows; re-run preprocess"
            )
        group_rows = np.concatenate(groups) if groups else np.empty(0, dtype=np.int64)
        self.layout = ShardLayout(
            buckets=np.concatenate(buckets) if buckets else np.empty(0, dtype=np.int16),
            bucket_names=names,
            lengths=np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int32),
            piece_starts=np.concatenate([[0], np.cumsum(group_rows)]).astype(np.int64),
            piece_shard=np.repeat(np.arange(len(groups), dtype=np.int32), [len(g) for g in groups]),
        )
        self.num_image_tokens = np.concatenate(tokens) if tokens else np.empty(0, dtype=np.int32)
        self.keys = pa.concat_arrays(keys) if keys else pa.array([], pa.string())
        self.file_bytes = np.asarray(sizes, dtype=np.int64)  # (F,) bytes of each shard file
        self._lock = threading.Lock()
        self._footers: OrderedDict[int, pq.FileMetaData] = OrderedDict()
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def _read_light(self, path: str) -> tuple[pa.Table, np.ndarray, int]:
        """(light columns, rows per row group, file size) of one shard file."""
        with self.store.fs.open_input_file(self.store.path(path)) as f:
            md = read_footer(f)
            groups = np.asarray([md.row_group(i).num_rows for i in range(md.num_row_groups)], dtype=np.int64)
            table = pq.ParquetFile(f, metadata=md, pre_buffer=True).read(columns=list(LIGHT_COLUMNS))
            return table, groups[groups > 0], f.size()

    def __len__(self) -> int:
        return len(self.layout)

    @property
    def infos(self) -> list[SampleInfo]:
        """One SampleInfo (bucket, length) per sample: Python objects, for small data and tests (`layout` is the index)."""
        return self.layout.infos()

    @property
    def index_nbytes(self) -> int:
        """Bytes the per-sample index holds (layout, visual tokens, keys): what a process pays per sample opened."""
        lay = self.layout
        arrays = (lay.buckets, lay.lengths, lay.piece_starts, lay.piece_shard, self.num_image_tokens)
        return sum(a.nbytes for a in arrays) + self.keys.nbytes

    @property
    def fingerprint(self) -> str:
        """`Manifest.fingerprint`: what a resumed epoch plan checks it still indexes the same samples by."""
        return self.manifest.fingerprint

    @property
    def num_pieces(self) -> int:
        return len(self.layout.piece_shard)

    def location(self, index: int) -> tuple[str, int]:
        """(shard path, row in that file) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard = int(self.layout.piece_shard[self.layout.piece_of(np.asarray([index]))[0]])
        first = int(self.layout.piece_starts[self.layout.shard_pieces[shard]])
        return self.shards[shard], index - first

    def piece_location(self, piece: int) -> tuple[str, int]:
        """(shard path, row-group index in that file) of a piece."""
        shard = int(self.layout.piece_shard[piece])
        return self.shards[shard], piece - int(self.layout.shard_pieces[shard])

    def _footer(self, shard: int) -> pq.FileMetaData:
        with self._lock:
            md = self._footers.get(shard)
            if md is not None:
                self._footers.move_to_end(shard)
                return md
        with self._open(shard) as f:
            md = read_footer(f)
        with self._lock:
            self._footers[shard] = md
            while len(self._footers) > FOOTER_CACHE:
                self._footers.popitem(last=False)
        return md

    def _open(self, shard: int) -> pa.NativeFile:
        return self.store.fs.open_input_file(self.store.path(self.shards[shard]))

    def read_piece(self, piece: int) -> pa.Table:
        """One row group, all SHARD_SCHEMA columns: one ranged read of its bytes (the footer comes from a small
        cache of the shards last read, so a rank walking a file's row groups reads its footer once).

        Raises:
            OSError: the read failed; the message names the file and row group.
        """
        if not 0 <= piece < self.num_pieces:
            raise IndexError(f"row group {piece} out of range for {self.num_pieces} row groups")
        shard = int(self.layout.piece_shard[piece])
        path, group = self.piece_location(piece)
        try:
            md = self._footer(shard)
            with self._open(shard) as f:
                return pq.ParquetFile(f, metadata=md, pre_buffer=True).read_row_group(group)
        except OSError as e:
            raise OSError(f"{self.uri}/{path}: reading row group {group}: {e}") from e

    def _piece(self, piece: int) -> pa.Table:
        table = self._cache.get(piece)
        if table is None:
            table = self.read_piece(piece)
            self._cache[piece] = table
            while len(self._cache) > self.cache_pieces:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(piece)
        return table

    def rows(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Full shard rows (all SHARD_SCHEMA columns) of these samples, in the order given: one row-group read (or
        cache hit) per row group touched. Random access for tools and tests; training reads with `RankLoader`."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"sample index(es) {bad[:5]} out of range for {len(self)} samples")
        pieces = self.layout.piece_of(np.asarray(indices, dtype=np.int64)).tolist()
        by_piece: dict[int, list[int]] = {}
        for pos, p in enumerate(pieces):
            by_piece.setdefault(p, []).append(pos)
        out: list[dict[str, Any] | None] = [None] * len(indices)
        for piece, positions in by_piece.items():
            start = int(self.layout.piece_starts[piece])
            taken = self._piece(piece).take(pa.array([indices[p] - start for p in positions], pa.int64()))
            for p, row in zip(positions, taken.to_pylist(), strict=True):
                out[p] = row
        return out  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        # A copy (a loader worker process) gets the index, not the cached row groups or the lock.
        state = self.__dict__.copy()
        state["_cache"], state["_footers"], state["_lock"] = OrderedDict(), OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ShardSet({self.uri!r}, samples={len(self)}, shards={len(self.shards)}, row groups={self.num_pieces})"

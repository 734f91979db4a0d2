"""Preprocessing's record plane: every per-record step before the image and token work, as Ray Data stages.

The driver only ever sees per-chunk, per-partition and per-unit aggregates. Records live in files under the run's
work folder (`_work/run-…` in the output), hash-partitioned by sample key:

1. `count_chunk` (JSONL only): lines starting in each byte range of an annotation file, so every chunk knows the
   physical number of its first line.
2. `read_chunk`: one byte range of a JSONL file, or a whole JSON array streamed (`pipelines.annotations`), →
   records (id, validation, image path, a digest of the raw record, the mixture's pick hash) written to
   `records/p=NNNNN/` by `partition_of(key)`; returns counts and, for a source sampled by ratio or cap, a histogram
   of the pick hashes (the driver finds the cut from it).
3. `diff_partition`: one partition's records: duplicate ids, the mixture's selection, image fingerprints, content
   hashes, and the join with the previous index's rows of the same keys → `todo` (new or changed samples, cut
   into work units, one Parquet row group each), `keep` (unchanged entries), `removed` (previous entries to drop
   from their shards).

The partition count is a power of two chosen from the annotation bytes (`partition_bits`); an index written with
another count is read through `old_index_files` (hash prefixes nest, so a partition maps onto one or a few old
files).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from convllava.data.shards import INDEX_SCHEMA, QUARANTINE, quarantine_text, write_parquet
from convllava.io import storage
from convllava.io.storage import Store, is_s3
from pipelines import annotations
from pipelines.config import Source
from pipelines.ray_runtime import adopt_secrets
from pipelines.sources import MAX_RECORD_BYTES, SourceError, _check_record, resolve_image

PARTITION_BYTES = 64 << 20  # annotation bytes per partition (~100k LLaVA records): what one diff task holds
MAX_PARTITION_BITS = 12
CHUNK_BYTES = 64 << 20  # a JSONL file is read in byte ranges of about this size, in parallel
FLUSH_ROWS = 50_000  # a reading task writes its partitions' buffers out at this many records
PICK_BINS = 1 << 16  # the selection histogram: the first 4 hex digits of the pick hash
RAW_CHARS = 2000  # what a quarantine report keeps of a record

RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("id", pa.string()),
        ("line", pa.int64()),
        ("raw", pa.string()),  # the first RAW_CHARS characters
        ("raw_digest", pa.string()),  # sha256 of the whole record: a change anywhere in it is a change
        ("conversations", pa.string()),  # JSON, for records that passed validation
        ("image", pa.string()),
        ("image_uri", pa.string()),
        ("category", pa.string()),  # an error found while reading
        ("reason", pa.string()),
        ("checkable", pa.bool_()),  # a JSON object: a repeated id makes it a duplicate
        ("pick", pa.string()),  # sha256(seed:source:id) for a source sampled by ratio or cap
    ]
)
TODO_SCHEMA = pa.schema([*(f for f in RECORD_SCHEMA if f.name not in ("raw_digest", "checkable", "pick"))])
TODO_SCHEMA = TODO_SCHEMA.append(pa.field("content_hash", pa.string()))
REMOVED_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string())])


def partition_bits(total_bytes: int) -> int:
    """log2 of the partition count for this many annotation bytes.

    >>> partition_bits(0), partition_bits(64 << 20), partition_bits((64 << 20) + 1), partition_bits(10 << 30)
    (0, 0, 1, 8)
    """
    return min(MAX_PARTITION_BITS, max(0, math.ceil(math.log2(max(total_bytes, 1) / PARTITION_BYTES))))


def partition_of(key: str, bits: int) -> int:
    """The partition of a sample key: the first `bits` bits of its BLAKE2b hash (so partitions nest across counts)."""
    if bits == 0:
        return 0
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") >> (32 - bits)


def old_index_files(index: str, p: int, bits: int, old_bits: int) -> list[str]:
    """The files of an index written with `old_bits` that can hold keys of partition `p` under `bits`."""
    if old_bits <= bits:
        qs = [p >> (bits - old_bits)]
    else:
        qs = list(range(p << (old_bits - bits), (p + 1) << (old_bits - bits)))
    return [index_file(index, q, old_bits) for q in qs]


def index_file(index: str, p: int, bits: int) -> str:
    return f"{index}/part-{p:05d}-of-{1 << bits:05d}.parquet"


def work_file(work: str, kind: str, p: int) -> str:
    return f"{work}/{kind}/p-{p:05d}.parquet"


def entry_hash(key: str, content_hash: str) -> int:
    """A sample's term of the manifest's `input_fingerprint` (the sum of all terms mod 2**256: order-free)."""
    return int.from_bytes(hashlib.sha256(f"{key}\x1f{content_hash}".encode()).digest(), "big")


def _result(value: dict[str, Any]) -> dict[str, str]:
    """A stage's aggregate as one Ray Data row (JSON: rows of one schema, whatever keys the aggregate has)."""
    return {"result": json.dumps(value)}


# ------------------------------------------------------------------------------------------------------ reading


def count_chunk(item: dict[str, Any], output: str, secrets: dict[str, Any] | None = None) -> dict[str, str]:
    adopt_secrets(secrets)
    try:
        lines = annotations.count_lines(item["uri"], item["start"], item["stop"])
    except SourceError as e:
        return _result({"error": str(e)})
    return _result({"chunk": item["chunk"], "lines": lines})


def read_chunk(
    item: dict[str, Any], output: str, work: str, bits: int, seed: int, secrets: dict[str, Any] | None = None
) -> dict[str, str]:
    """Records of one chunk into the work folder's partitions; returns {chunk, source, records, hist, files}, or
    {error} for an annotation file that cannot be read on (a JSON array cut short: `SourceError`)."""
    adopt_secrets(secrets)
    try:
        return _result(_read_chunk(item, Store(output), work, bits, seed))
    except SourceError as e:
        return _result({"error": str(e)})


def _read_chunk(item: dict[str, Any], store: Store, work: str, bits: int, seed: int) -> dict[str, Any]:
    source, root, selecting = item["source"], item["image_root"], item["selecting"]
    if item["kind"] == "json":
        entries = annotations.iter_json_array(item["uri"])
    else:
        entries = annotations.iter_jsonl(item["uri"], item["start"], item["stop"], item["first_line"])
    buffers: dict[int, list[dict[str, Any]]] = {}
    hist = np.zeros(PICK_BINS, dtype=np.int64) if selecting else None
    count = buffered = flushes = files = 0

    def flush() -> None:
        nonlocal buffered, flushes, files
        for p, rows in sorted(buffers.items()):
            path = f"{work}/records/p={p:05d}/c{item['chunk']:05d}-{flushes:05d}.parquet"
            write_parquet(store, path, pa.Table.from_pylist(rows, schema=RECORD_SCHEMA))
            files += 1
        buffers.clear()
        buffered, flushes = 0, flushes + 1

    for line, raw, parsed, error in entries:
        row = record_row(source, root, seed if selecting else None, line, raw, parsed, error)
        if hist is not None:
            hist[int(row["pick"][:4], 16)] += 1
        buffers.setdefault(partition_of(row["key"], bits), []).append(row)
        count, buffered = count + 1, buffered + 1
        if buffered >= FLUSH_ROWS:
            flush()
    if buffered:
        flush()
    return {
        "chunk": item["chunk"],
        "source": source,
        "records": count,
        "files": files,
        "hist": np.flatnonzero(hist).tolist() if hist is not None else None,
        "hist_counts": hist[hist > 0].tolist() if hist is not None else None,
    }


def iter_source(source: Source, seed: int | None = None) -> Iterator[dict[str, Any]]:
    """Every record row of one source, read as one stream in this process (for tools and tests; preprocessing reads
    a source's chunks in parallel)."""
    uri = source.annotations
    if annotations.file_kind(uri) == "json":
        entries = annotations.iter_json_array(uri)
    else:
        entries = annotations.iter_jsonl(uri, 0, annotations.file_size(uri), 1)
    for entry in entries:
        yield record_row(source.name, source.image_root, seed, *entry)


def record_row(
    source: str, image_root: str, seed: int | None, line: int, raw: str, item: object, error: tuple | None
) -> dict[str, Any]:
    """One annotation record as a row of RECORD_SCHEMA: its id (`line-N` without one), what is wrong with it (all but
    a repeated id, which needs every record of the key: `diff_partition`), its image's location."""
    rid = str(item.get("id")) if isinstance(item, dict) and item.get("id") not in (None, "") else f"line-{line}"
    checkable = error is None and isinstance(item, dict)
    if error is None:
        error = _check_record(item, rid, {}, line)
    image = uri = None
    if error is None and isinstance(item.get("image"), str):
        image = item["image"]
        try:
            uri = resolve_image(image_root, image)
        except ValueError as e:
            error = ("path_escape", str(e))
    if len(raw) > MAX_RECORD_BYTES and error is None:
        error = ("malformed_record", f"record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    return {
        "key": f"{source}/{rid}",
        "source": source,
        "id": rid,
        "line": line,
        "raw": raw[:RAW_CHARS],
        "raw_digest": hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest(),
        "conversations": json.dumps(item["conversations"], ensure_ascii=False) if error is None else None,
        "image": image,
        "image_uri": uri,
        "category": error[0] if error else None,
        "reason": error[1] if error else None,
        "checkable": checkable,
        "pick": hashlib.sha256(f"{seed}:{source}:{rid}".encode()).hexdigest() if seed is not None else None,
    }


def selection_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin, rank inside it) of the k-th smallest pick hash (1-based k) given the histogram of all of them.

    >>> selection_bin(np.array([2, 0, 3, 1]), 4)
    (2, 2)
    """
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, k))
    return b, k - int(cum[b - 1] if b else 0)


def picks_in_bin(
    item: dict[str, Any], output: str, work: str, wanted: dict[str, int], secrets: dict[str, Any] | None = None
) -> dict[str, str]:
    """(pick, line) of the records of partition `item["p"]` whose pick hash falls in `wanted[source]`'s bin."""
    adopt_secrets(secrets)
    store = Store(output)
    table = _read_dir(store, f"{work}/records/p={item['p']:05d}", ["source", "pick", "line"])
    found: dict[str, list] = {}
    if table is not None:
        for source, pick, line in zip(*(table.column(c).to_pylist() for c in ("source", "pick", "line")), strict=True):
            if source in wanted and pick is not None and int(pick[:4], 16) == wanted[source]:
                found.setdefault(source, []).append([pick, line])
    return _result(found)


# --------------------------------------------------------------------------------------------------------- diff


def diff_partition(
    item: dict[str, Any],
    output: str,
    work: str,
    bits: int,
    cuts: dict[str, list],
    config_hash: str,
    previous: dict[str, Any] | None,
    on_disk: list[str],
    unit_size: int,
    layout: str,
    fingerprint_only: bool = False,
    secrets: dict[str, Any] | None = None,
) -> dict[str, str]:
    """One partition: duplicates, selection, content hashes, and the join with the previous index (see module doc).
    With `fingerprint_only`, just the partition's term of the input fingerprint (nothing is written).

    `cuts`: per sampled source, the largest (pick, line) that is selected. `previous`: {index, bits} of the last
    finished run, or None. `on_disk`: the shard files present (an entry whose shard went missing is redone).
    """
    adopt_secrets(secrets)
    store, p = Store(output), item["p"]
    table = _read_dir(store, f"{work}/records/p={p:05d}")
    rows = table.to_pylist() if table is not None else []
    first: dict[str, int] = {}
    seen: Counter[str] = Counter()
    for r in sorted(rows, key=lambda r: (r["source"], r["line"])):
        first.setdefault(r["key"], r["line"])
        seen[r["key"]] += 1
        if r["checkable"] and seen[r["key"]] > 1:
            r["category"], r["reason"] = "duplicate_id", f"id {r['id']!r} already used at line {first[r['key']]}"
            r["conversations"] = None
            # Quarantined under a key of its own (its occurrence: stable when lines move), so index keys stay unique.
            r["key"] = f"{r['key']}#{seen[r['key']]}"
    chosen = [r for r in rows if r["source"] not in cuts or (r["pick"], r["line"]) <= tuple(cuts[r["source"]])]
    prints = image_fingerprints({r["image_uri"] for r in chosen if r["image_uri"] and not r["category"]})
    for r in chosen:
        image = (prints.get(r["image_uri"], "missing") if r["image_uri"] else "none") if not r["category"] else "-"
        payload = "\x1f".join([config_hash, r["source"], r["id"], r["raw_digest"], image])
        r["content_hash"] = hashlib.sha256(payload.encode("utf-8", "replace")).hexdigest()
    current = {r["key"]: r for r in chosen}
    fingerprint = hex(sum(entry_hash(k, r["content_hash"]) for k, r in current.items()) % (1 << 256))
    if fingerprint_only:
        return _result({"p": p, "fingerprint": fingerprint})

    old = _previous_rows(store, previous, p, bits) if previous else []
    present = set(on_disk)
    keep, removed = [], []
    for e in old:
        r = current.get(e["key"])
        if r is not None and r["content_hash"] == e["content_hash"] and (not e["shard"] or e["shard"] in present):
            keep.append({**e, "line": r["line"]})
        else:
            removed.append({"key": e["key"], "shard": e["shard"]})
    reused = {e["key"] for e in keep}
    todo = sorted((r for r in chosen if r["key"] not in reused), key=lambda r: r["key"])
    units = _write_todo(store, work_file(work, "todo", p), todo, unit_size, layout)
    write_parquet(store, work_file(work, "keep", p), pa.Table.from_pylist(keep, schema=INDEX_SCHEMA))
    write_parquet(store, work_file(work, "removed", p), pa.Table.from_pylist(removed, schema=REMOVED_SCHEMA))
    return _result(
        {
            "p": p,
            "read": Counter(r["source"] for r in chosen),
            "todo": len(todo),
            "reused": len(keep),
            "removed": len(removed),
            "removed_by_shard": Counter(e["shard"] for e in removed if e["shard"]),
            "units": units,
            "fingerprint": fingerprint,
        }
    )


def _previous_rows(store: Store, previous: dict[str, Any], p: int, bits: int) -> list[dict[str, Any]]:
    rows = []
    for path in old_index_files(previous["index"], p, bits, previous["bits"]):
        rows.extend(store.read_table(path).to_pylist())
    if previous["bits"] < bits:  # an old file spans several partitions now: keep this one's keys
        rows = [e for e in rows if partition_of(e["key"].split("#")[0], bits) == p]
    return rows


def _write_todo(store: Store, path: str, todo: list[dict], unit_size: int, layout: str) -> list[list]:
    """The samples to process, one Parquet row group per work unit; returns [group, unit id, samples] per unit.

    Units are the key-sorted samples cut as evenly as possible into at most `unit_size`: a pure function of the
    samples, `unit_size` and the file layout (`layout`), never of the cluster. The unit id names a unit's finished
    record (`pipelines.worker`), so a rerun of an interrupted run skips the units it finished."""
    count = -(-len(todo) // unit_size)
    bounds = [round(i * len(todo) / count) for i in range(count + 1)] if count else [0]
    table = pa.Table.from_pylist([{k: r[k] for k in TODO_SCHEMA.names} for r in todo], schema=TODO_SCHEMA)
    sink = pa.BufferOutputStream()
    units = []
    with pq.ParquetWriter(sink, TODO_SCHEMA, compression="zstd") as writer:
        for g in range(count):
            start, stop = bounds[g], bounds[g + 1]
            writer.write_table(table.slice(start, stop - start), row_group_size=stop - start)
            text = layout + "".join(f"\n{r['key']}\x1f{r['content_hash']}" for r in todo[start:stop])
            units.append([g, hashlib.sha256(text.encode()).hexdigest()[:24], stop - start])
        if not count:
            writer.write_table(table)
    store.write_bytes(path, sink.getvalue().to_pybytes())
    return units


def image_fingerprints(uris: set[str]) -> dict[str, str]:
    """A cheap content fingerprint per image: size + modification time (a stat, or an S3 HEAD; 16 at a time)."""

    def one(uri: str) -> tuple[str, str]:
        if is_s3(uri):
            fs, path = storage.filesystem(uri)
            info = fs.get_file_info(path)
            return uri, "missing" if info.size is None else f"s3:{info.size}:{info.mtime_ns}"
        try:
            st = os.stat(uri)
            return uri, f"stat:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return uri, "missing"

    if not any(is_s3(u) for u in uris):
        return dict(map(one, uris))
    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, sorted(uris)))


# -------------------------------------------------------------------------------------------------------- files


def _read_dir(store: Store, prefix: str, columns: list[str] | None = None) -> pa.Table | None:
    """Every Parquet file under `prefix`, concatenated in path order; None when there is none."""
    paths = store.list_files(prefix)
    if not paths:
        return None
    return pa.concat_tables([store.read_table(p, columns) for p in paths])


def removed_keys(store: Store, work: str, partitions: int, shards: set[str]) -> dict[str, set[str]]:
    """shard → keys to drop from it, from every partition's `removed` file (a few per cent of the samples)."""
    out: dict[str, set[str]] = {}
    for p in range(partitions):
        table = store.read_table(work_file(work, "removed", p))
        table = table.filter(pc.is_in(table["shard"], value_set=pa.array(sorted(shards), pa.string())))
        for key, shard in zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True):
            out.setdefault(shard, set()).add(key)
    return out


# -------------------------------------------------------------------------------------------------------- index


def index_partition(
    item: dict[str, Any],
    output: str,
    work: str,
    units_dir: str,
    index: str,
    bits: int,
    part_map: dict[str, str],
    shard_map: dict[str, str],
    max_length: int,
    secrets: dict[str, Any] | None = None,
) -> dict[str, str]:
    """One partition of the new index: its unchanged entries (`keep`, with the shards rewritten by stale-row drops)
    and its units' entries (with their parts' merged files), sorted by key; its `quarantine/` part; returns the
    manifest's aggregates over them."""
    from pipelines.report import ASPECT_BINS, length_histogram

    adopt_secrets(secrets)
    store, p = Store(output), item["p"]
    entries = store.read_table(work_file(work, "keep", p)).to_pylist()
    for e in entries:
        e["shard"] = shard_map.get(e["shard"], e["shard"])
    for unit in item["units"]:
        for e in store.read_table(f"{units_dir}/{unit}.parquet").to_pylist():
            entries.append({**e, "shard": part_map.get(e["shard"], e["shard"])})
    entries.sort(key=lambda e: e["key"])
    write_parquet(store, index_file(index, p, bits), pa.Table.from_pylist(entries, schema=INDEX_SCHEMA))
    quarantined = sorted((e for e in entries if e["status"] == "quarantined"), key=lambda e: (e["source"], e["line"]))
    part = f"{QUARANTINE}/part-{p:05d}.jsonl"
    if quarantined:
        store.write_text(part, quarantine_text(quarantined))
    else:
        store.delete(part)
    written = [e for e in entries if e["status"] == "written"]
    aspects = [e["orig_aspect"] for e in written if e["orig_aspect"]]
    return _result(
        {
            "p": p,
            "entries": len(entries),
            "unique": len({e["key"] for e in entries}) == len(entries),
            "written": Counter(e["source"] for e in written),
            "quarantined": Counter(e["source"] for e in quarantined),
            "reasons": Counter(e["category"] for e in quarantined),
            "buckets": Counter(e["bucket"] for e in written),
            "shards": Counter(e["shard"] for e in written),
            "pixels": sum(e["pixels"] or 0 for e in written),
            "padded": math.fsum((e["padded_fraction"] or 0) * (e["pixels"] or 0) for e in written),
            "lengths": length_histogram([e["length"] for e in written], max_length)["counts"],
            "length_sum": sum(e["length"] for e in written),
            "visual_tokens": sum(e["num_image_tokens"] for e in written),
            "aspects": np.histogram(aspects, bins=ASPECT_BINS)[0].tolist(),
            "fingerprint": hex(sum(entry_hash(e["key"], e["content_hash"]) for e in entries) % (1 << 256)),
        }
    )

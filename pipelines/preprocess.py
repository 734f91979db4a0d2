"""`convllava preprocess`: LLaVA-style annotations + images → Parquet shards partitioned by resolution bucket.

Driver: read every source (cheap: JSON + image fingerprints) → diff against the previous run's index by
content hash → Ray Data processes only new or changed samples in parallel work units, each writing one "part" file
per bucket it touches → merge phase: per bucket, this run's parts in key order are grouped greedily into runs of at
most `shard_rows` rows and `shard_bytes` file bytes, and each run of several parts becomes one shard file (a Ray
task per run; the driver never reads shard data) → rows of removed or changed samples are dropped from their old
shards → `index.jsonl`, `quarantine.jsonl`, `manifest.json` and `buckets.png` are written from the complete index,
so `written + quarantined == read` always holds → shard files the index does not reference (merged parts, stale
files) are deleted.

The units and the grouping depend only on the samples to do, `unit_size` and the size limits, never on the
cluster: the same input and config give the same shard files. An incremental run leaves the shard files of
unchanged samples untouched and writes its new samples into new ones. A run that dies after some merges leaves a
sample in both a part and a merged file; the next run's `_recover_from_shards` keeps one of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from convllava.shards import (
    ENTRY_COLUMNS,
    QUARANTINE,
    SHARDS_DIR,
    Manifest,
    RunCounts,
    ShardFile,
    SourceCounts,
    read_index,
    shard_bucket,
    shard_path,
    write_index,
    write_quarantine,
    write_shard,
    written_entry,
)
from convllava.storage import OutputError, Store
from pipelines.config import Mixture, PreprocessConfig
from pipelines.report import bucket_histogram_png, code_version, length_histogram, summary_table
from pipelines.sources import Record, assign_content_hashes, image_fingerprints, read_records, select
from pipelines.worker import UnitProcessor

log = logging.getLogger(__name__)


class QuarantineLimitExceeded(RuntimeError):
    """More samples were quarantined than the configured fraction allows (outputs are still written)."""


@dataclass
class PreprocessResult:
    manifest: Manifest
    summary: str

    @property
    def ok(self) -> bool:
        return self.manifest.quarantine_fraction <= self.manifest.config["max_quarantine_fraction"]


def run_preprocess(
    mixture: Mixture, config: PreprocessConfig, output: str, address: str | None = None, echo=print
) -> PreprocessResult:
    """Preprocess `mixture` into `output` (local directory or `s3://` prefix), incrementally.

    Raises:
        OutputError: the output cannot be written (checked before any work).
        SourceError: an annotation file is missing or not parseable at all.
        QuarantineLimitExceeded: after writing everything, when the quarantined fraction is over the limit.
    """
    start = time.time()
    store = Store(output)
    store.check_writable()
    config_hash = config.output_hash()

    records, per_source = read_mixture(mixture, config)

    previous = read_index(store)
    current = {r.key: r for r in records}
    on_disk = set(store.list_files(SHARDS_DIR))
    # Unchanged samples are reused, unless their shard went missing since (then they are redone). Their entries take
    # the line the record is on now, so the quarantine report points at the annotation file as it is.
    reused = {
        k: {**e, "line": current[k].line}
        for k, e in previous.items()
        if k in current
        and current[k].content_hash == e["content_hash"]
        and (not e.get("shard") or e["shard"] in on_disk)
    }
    removed = [e for k, e in previous.items() if k not in reused]
    resumed = _recover_from_shards(store, on_disk, current, previous, reused)
    todo = sorted((r for r in records if r.key not in reused and r.key not in resumed), key=lambda r: r.key)
    echo(
        f"preprocess: {len(records)} samples read, {len(reused)} unchanged, {len(todo)} to process"
        + (f" ({len(resumed)} more finished by an interrupted run)" if resumed else "")
        + f", {len(removed)} removed or changed since the last run"
    )

    done, failures = _process(todo, config, output, address) if todo else ([], [])
    if failures:
        _stop(
            store,
            len(done) + len(resumed),
            failures,
            len(todo) + len(resumed),
            "The previous index and manifest are unchanged.",
        )
    if done:
        _merge_parts(store, done, config)
    new_entries = [*done, *resumed.values()]
    try:
        _drop_stale_rows(store, removed, reused, {e.get("shard") for e in new_entries}, config)
        entries = sorted([*reused.values(), *new_entries], key=lambda e: e["key"])
        if len(entries) != len(records):
            raise RuntimeError(f"internal error: {len(records)} samples read but {len(entries)} accounted for")
        write_index(store, entries)
        quarantined = [e for e in entries if e["status"] == "quarantined"]
        write_quarantine(store, sorted(quarantined, key=lambda e: (e["source"], e["line"])))
        run = RunCounts(len(todo), len(reused), len(removed), len(resumed), round(time.time() - start, 2))
        manifest = _manifest(entries, per_source, config, config_hash, run)
        manifest.save(store)
        store.write_bytes("buckets.png", bucket_histogram_png(entries))
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        _stop(
            store,
            len(new_entries),
            [f"writing the index and manifest failed: {type(e).__name__}: {e}"],
            len(new_entries),
            "The output is not usable until a rerun finishes it.",
        )
    try:
        _delete_unreferenced_shards(store, entries)
    except OSError as e:
        log.warning("could not delete unreferenced shard files under %s: %s", output, e)
    result = PreprocessResult(manifest, summary_table(manifest))
    echo(result.summary)
    if not result.ok:
        raise QuarantineLimitExceeded(
            f"{manifest.quarantined} of {manifest.read} samples quarantined "
            f"({manifest.quarantine_fraction:.1%}), over the limit {config.max_quarantine_fraction:.1%}; "
            f"see {output.rstrip('/')}/{QUARANTINE}"
        )
    return result


def read_mixture(mixture: Mixture, config: PreprocessConfig) -> tuple[list[Record], dict[str, SourceCounts]]:
    """Every selected record of every source, with its content hash (cheap: JSON + image fingerprints)."""
    records: list[Record] = []
    per_source: dict[str, SourceCounts] = {}
    for source in mixture.sources:
        found = read_records(source)
        chosen = select(found, source, config.seed)
        assign_content_hashes(chosen, image_fingerprints(chosen, source.image_root), config.output_hash())
        per_source[source.name] = SourceCounts(available=len(found), read=len(chosen))
        records.extend(chosen)
    return records, per_source


def input_fingerprint(content_hashes_by_key: dict[str, str]) -> str:
    """The manifest's `input_fingerprint`: one hash over every sample's content hash, in key order."""
    return hashlib.sha256("".join(content_hashes_by_key[k] for k in sorted(content_hashes_by_key)).encode()).hexdigest()


def fingerprint_mixture(mixture: Mixture, config: PreprocessConfig) -> str:
    """What `manifest.json` would record as `input_fingerprint` for this input and config, without processing."""
    records, _ = read_mixture(mixture, config)
    return input_fingerprint({r.key: r.content_hash for r in records})


def _process(
    todo: list[Record], config: PreprocessConfig, output: str, address: str | None
) -> tuple[list[dict], list[str]]:
    """Entries of the samples done, and one message per unit whose shards could not be written."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.ray_runtime import ensure_ray, share_secrets, worker_runtime_env

    ensure_ray(address)
    workers, threads = config.actors(max(1, int(ray.available_resources().get("CPU", 1))))
    units = _units(todo, config.unit_size)
    items = [{"unit": json.dumps([_unit_record(r) for r in unit])} for unit in units]
    workers = min(workers, len(units))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
        UnitProcessor,
        fn_constructor_kwargs={
            "config": config.to_dict(),
            "output": output,
            "secrets": share_secrets(),
            "threads": threads,
        },
        compute=ActorPoolStrategy(size=workers),  # a fixed pool: all actors load the tokenizer at once, up front
        num_cpus=threads,
        runtime_env=worker_runtime_env(),
    )
    rows = ds.take_all()
    return [entry for row in rows for entry in json.loads(row["entries"])], [r["failed"] for r in rows if r["failed"]]


def _units(todo: list[Record], unit_size: int) -> list[list[Record]]:
    """Units of at most `unit_size` samples, as even as possible (no short last unit for one actor to finish alone).

    A pure function of the samples and `unit_size`, never of the cluster: the same input gives the same shard files.
    """
    count = -(-len(todo) // unit_size)
    bounds = [round(i * len(todo) / count) for i in range(count + 1)] if count else [0]
    return [todo[bounds[i] : bounds[i + 1]] for i in range(count)]


def _merge_parts(store: Store, done: list[dict], config: PreprocessConfig) -> None:
    """The merge phase: each run of several parts that `_merge_groups` finds becomes one shard file, merged by a Ray
    task on the cluster (all at once), and the entries of its parts point at it. A merge that fails keeps its parts
    (a valid output, in smaller files) with a warning."""
    import ray

    from pipelines.ray_runtime import share_secrets, worker_runtime_env
    from pipelines.worker import merge_parts

    try:
        sizes = {path: info.size for path, info in store.listing(SHARDS_DIR).items()}
    except OSError as e:
        log.warning("not merging part files: listing %s/%s failed: %s", store.uri, SHARDS_DIR, e)
        return
    groups = _merge_groups(done, sizes, config.shard_rows, config.shard_bytes)
    if not groups:
        return
    task = ray.remote(merge_parts).options(runtime_env=worker_runtime_env())
    secrets = share_secrets()
    refs = [
        task.remote(store.uri, bucket, parts, config.row_group_rows, config.row_group_bytes, secrets)
        for bucket, parts in groups
    ]
    merged: dict[str, str] = {}
    for (bucket, parts), ref in zip(groups, refs, strict=True):
        try:
            path = ray.get(ref)
        except ray.exceptions.RayError as e:
            log.warning("bucket %s: merging %d part files %s failed, keeping them: %s", bucket, len(parts), parts, e)
            continue
        merged.update(dict.fromkeys(parts, path))
    for e in done:
        if e.get("shard") in merged:
            e["shard"] = merged[e["shard"]]


def _merge_groups(
    entries: list[dict], sizes: dict[str, int], max_rows: int, max_bytes: int
) -> list[tuple[str, list[str]]]:
    """(bucket, part paths) of each merge: per bucket, the parts that `entries` point at, ordered by first key, cut
    greedily into consecutive runs of at most `max_rows` rows and `max_bytes` file bytes (`sizes`); runs of one
    part are left out (nothing to merge). A pure function of the parts, so of the samples, unit_size and the limits.

    >>> part = "shards/bucket=text/part-{}.parquet".format
    >>> entries = [{"key": k, "shard": part(n)} for k, n in [("a", 1), ("b", 1), ("c", 2), ("d", 3), ("e", 3)]]
    >>> _merge_groups(entries, dict.fromkeys(map(part, (1, 2, 3)), 100), max_rows=4, max_bytes=1000)
    [('text', ['shards/bucket=text/part-1.parquet', 'shards/bucket=text/part-2.parquet'])]
    """
    keys: dict[str, list[str]] = {}
    for e in entries:
        if e.get("shard"):
            keys.setdefault(e["shard"], []).append(e["key"])
    by_bucket: dict[str, list[tuple[str, str]]] = {}
    for path, found in keys.items():
        if path in sizes:  # a part that is not there (never expected) stays out of every merge
            by_bucket.setdefault(shard_bucket(path), []).append((min(found), path))
    groups = []
    for bucket, parts in sorted(by_bucket.items()):
        runs: list[list[str]] = []
        rows = size = 0
        for _, path in sorted(parts):
            n, nbytes = len(keys[path]), sizes[path]
            if runs and rows + n <= max_rows and size + nbytes <= max_bytes:
                runs[-1].append(path)
                rows, size = rows + n, size + nbytes
            else:
                runs.append([path])
                rows, size = n, nbytes
        groups.extend((bucket, run) for run in runs if len(run) > 1)
    return groups


def _unit_record(r: Record) -> dict[str, Any]:
    return {
        "key": r.key,
        "id": r.id,
        "source": r.source,
        "line": r.line,
        "raw": r.raw,
        "error": r.error,
        "conversations": (r.data or {}).get("conversations"),
        "image": r.image,
        "image_uri": r.image_uri,
        "content_hash": r.content_hash,
    }


def _recover_from_shards(
    store: Store, on_disk: set[str], current: dict[str, Record], previous: dict[str, dict], reused: dict[str, dict]
) -> dict[str, dict]:
    """Samples an interrupted run finished: shard files the index does not know, whose every row is a sample still
    to do with the same content. A full disk may leave no room for any record of progress; the shards are it."""
    known = {e.get("shard") for e in previous.values()}
    found: dict[str, dict] = {}
    for path in sorted(on_disk - known):
        if not path.endswith(".parquet"):
            continue
        try:
            rows = store.read_table(path, columns=list(ENTRY_COLUMNS)).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for a truncated file
            log.warning("ignoring unreadable shard %s from an interrupted run: %s", path, e)
            continue
        usable = all(
            r["key"] in current
            and r["key"] not in reused
            and r["key"] not in found
            and current[r["key"]].content_hash == r["content_hash"]
            for r in rows
        )
        if usable:
            found.update({r["key"]: {**written_entry(r), "shard": path} for r in rows})
    return found


def _delete_unreferenced_shards(store: Store, entries: list[dict]) -> None:
    """Shard files no entry points at (left by an interrupted run, or replaced): they only take space."""
    referenced = {e.get("shard") for e in entries}
    for path in store.list_files(SHARDS_DIR):
        if path not in referenced:
            store.delete(path)


def _stop(store: Store, done: int, failures: list[str], total: int, after: str) -> None:
    more = f" (and {len(failures) - 1} more failed units)" if len(failures) > 1 else ""
    raise OutputError(
        f"output {store.uri}: preprocessing stopped, {total - done} of {total} samples not done: "
        f"{failures[0]}{more}; the {done} samples finished are kept in their shard files and a rerun "
        f"processes only the rest. {after}"
    )


def _drop_stale_rows(
    store: Store, removed: list[dict], reused: dict[str, dict], fresh: set[str], config: PreprocessConfig
) -> None:
    """Rewrite each shard that holds a removed/changed sample without it; other shards stay untouched.

    A shard this run wrote (`fresh`) is never deleted: redoing the samples of a shard that went missing writes the
    same rows under the same name."""
    import pyarrow as pa
    import pyarrow.compute as pc

    affected = sorted({e["shard"] for e in removed if e.get("shard")} - fresh)
    for path in affected:
        keep = [k for k, e in reused.items() if e.get("shard") == path]
        if keep:
            table = store.read_table(path)
            table = table.filter(pc.is_in(table["key"], value_set=pa.array(keep)))
            new_path = shard_path(shard_bucket(path), table["content_hash"].to_pylist())
            write_shard(store, new_path, table, config.row_group_rows, config.row_group_bytes)
            for k in keep:
                reused[k]["shard"] = new_path
            if new_path == path:
                continue
        store.delete(path)


def _manifest(
    entries: list[dict], per_source: dict[str, SourceCounts], config: PreprocessConfig, config_hash: str, run: RunCounts
) -> Manifest:
    written = [e for e in entries if e["status"] == "written"]
    quarantined = [e for e in entries if e["status"] == "quarantined"]
    for name, counts in per_source.items():
        counts.written = sum(e["source"] == name for e in written)
        counts.quarantined = sum(e["source"] == name for e in quarantined)
    shards = Counter(e["shard"] for e in written)
    pixels = sum(e.get("pixels") or 0 for e in written)
    padded = sum((e.get("padded_fraction") or 0) * (e.get("pixels") or 0) for e in written)
    read = len(entries)
    return Manifest(
        read=read,
        written=len(written),
        quarantined=len(quarantined),
        reconciled=len(written) + len(quarantined) == read,
        quarantine_fraction=len(quarantined) / read if read else 0.0,
        buckets=dict(sorted(Counter(e["bucket"] for e in written).items())),
        sources=per_source,
        quarantine_reasons=dict(sorted(Counter(e["category"] for e in quarantined).items())),
        input_fingerprint=input_fingerprint({e["key"]: e["content_hash"] for e in entries}),
        config=config.to_dict(),
        config_hash=config_hash,
        code_version=code_version(),
        padded_pixel_fraction=padded / pixels if pixels else 0.0,
        token_length_histogram=length_histogram([e["length"] for e in written], config.max_length),
        visual_tokens=sum(e["num_image_tokens"] for e in written),
        shards=[ShardFile(p, shard_bucket(p), n) for p, n in sorted(shards.items())],
        run=run,
        mean_length=math.fsum(e["length"] for e in written) / len(written) if written else 0.0,
    )

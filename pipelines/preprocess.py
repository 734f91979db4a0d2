"""`convllava preprocess`: LLaVA-style annotations + images → Parquet shards partitioned by resolution bucket.

The driver holds per-file, per-partition, per-unit and per-shard aggregates only; every per-record step is a Ray
Data stage (`pipelines.partition`, `pipelines.worker`), its records in files under the output's `_work/` folder:

1. read: JSONL files in byte ranges in parallel (a count pass first numbers their lines), JSON arrays streamed;
   records are validated and hash-partitioned by sample key (a power-of-two count chosen from the input's bytes).
2. select: a source sampled by `ratio` or `cap` keeps the records with the smallest pick hashes: the driver finds
   the cut from the readers' hash histograms and the few records of the boundary bin.
3. diff, per partition: duplicate ids, image fingerprints, content hashes, and the join with the previous run's
   index partition → samples to do (in work units), unchanged entries, entries to drop.
4. process: Ray Data actors work unit by unit, each writing one "part" file per bucket it touches and then the
   unit's entries (`_work/units/<unit>.parquet`, its record of being finished: a rerun after an interruption skips
   it).
5. merge: per bucket, this run's parts in first-key order are grouped greedily into runs of at most `shard_rows`
   rows and `shard_bytes` file bytes; each run of several parts becomes one shard file (a Ray task).
6. drop: rows of removed or changed samples leave their old shards (a Ray task per few shards).
7. index, per partition: a new index version (`index/<version>/`), the `quarantine/` parts and the manifest's
   aggregates; then `manifest.json` (pointing at the new index: the switch), `buckets.png`, and the clean-up of
   files nothing references (merged parts, dropped shards, old index versions, `_work/`).

`written + quarantined == read` always holds; the units and the merge groups depend only on the samples to do,
`unit_size` and the size limits, never on the cluster: the same input and config give the same shard files. An
incremental run leaves the shard files of unchanged samples untouched and writes its new samples into new ones.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from convllava.data.shards import (
    INDEX_DIR,
    QUARANTINE,
    SHARDS_DIR,
    Manifest,
    RunCounts,
    ShardFile,
    SourceCounts,
    shard_bucket,
)
from convllava.io.storage import OutputError, Store
from pipelines import annotations, partition
from pipelines.config import Mixture, PreprocessConfig
from pipelines.report import bucket_histogram_png, code_version, summary_table
from pipelines.sources import SourceError

log = logging.getLogger(__name__)
WORK = "_work"  # the work folder in the output: this run's record files, and finished units (kept until success)
UNITS = f"{WORK}/units"


class QuarantineLimitExceeded(RuntimeError):
    """More samples were quarantined than the configured fraction allows (outputs are still written)."""


@dataclass
class PreprocessResult:
    manifest: Manifest
    summary: str

    @property
    def ok(self) -> bool:
        return self.manifest.quarantine_fraction <= self.manifest.config.max_quarantine_fraction


def run_preprocess(
    mixture: Mixture,
    config: PreprocessConfig,
    output: str,
    address: str | None = None,
    echo=print,
    in_process: bool = False,
) -> PreprocessResult:
    """Preprocess `mixture` into `output` (local directory or `s3://` prefix), incrementally.

    `in_process` runs every stage's items one after another in this process, without Ray: the same functions and
    the same output, for inputs of a few samples (the quickstart), where starting Ray would cost more than the work.

    Raises:
        OutputError: the output cannot be written (checked before any work).
        SourceError: an annotation file is missing or not parseable at all.
        QuarantineLimitExceeded: after writing everything, when the quarantined fraction is over the limit.
    """
    start = time.time()
    store = Store(output)
    store.check_writable()
    previous = Manifest.find(store)
    stages = _Stages(store, config, address, in_process)
    read = stages.read(mixture)
    on_disk = store.list_files(SHARDS_DIR)
    prior = {"index": previous.index, "bits": int(math.log2(previous.index_partitions))} if previous else None
    diffs = stages.diff(read, prior, on_disk)
    counts = {k: sum(d[k] for d in diffs) for k in ("todo", "reused", "removed")}
    units = [(d["p"], *u) for d in diffs for u in d["units"]]
    echo(
        f"preprocess: {sum(read.available.values())} records in {read.partitions} partitions, "
        f"{sum(sum(d['read'].values()) for d in diffs)} selected: {counts['reused']} unchanged, "
        f"{counts['todo']} to process in {len(units)} units, {counts['removed']} removed or changed since the last run"
    )
    results = stages.process(units) if units else []
    failures = [r["failed"] for r in results if r["failed"]]
    resumed = sum(r["resumed"] for r in results)
    if resumed:
        echo(f"preprocess: {resumed} samples finished by an interrupted run are reused")
    if failures:
        done = sum(u[3] for u, r in zip(units, results, strict=True) if not r["failed"])
        _stop(store, done, failures, counts["todo"], "The previous index and manifest are unchanged.")
    parts = [part for r in results for part in r["parts"]]
    part_map = stages.merge(parts) if parts else {}
    fresh = {*part_map, *part_map.values(), *(part["path"] for part in parts)}
    removed_by_shard: Counter[str] = sum((Counter(d["removed_by_shard"]) for d in diffs), Counter())
    shard_map = stages.drop_stale_rows(sorted(set(removed_by_shard) - fresh))
    version = f"{INDEX_DIR}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    units_of = {}
    for p, _, unit, _ in units:
        units_of.setdefault(p, []).append(unit)
    try:
        aggregates = stages.index(version, units_of, part_map, shard_map)
        run = RunCounts(counts["todo"] - resumed, counts["reused"], counts["removed"], resumed, 0.0)
        manifest = _manifest(aggregates, read, diffs, config, version, run)
        if not all(a["unique"] for a in aggregates) or manifest.read != sum(sum(d["read"].values()) for d in diffs):
            raise RuntimeError(f"internal error: the index of {output} does not account for every sample once")
        manifest.run.seconds = round(time.time() - start, 2)
        manifest.save(store)
        store.write_bytes("buckets.png", bucket_histogram_png(manifest.buckets, _sum_lists(aggregates, "aspects")))
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        _stop(
            store,
            counts["todo"],
            [f"writing the index and manifest failed: {type(e).__name__}: {e}"],
            counts["todo"],
            "The output is not usable until a rerun finishes it.",
        )
    try:
        _clean_up(store, manifest, read.partitions)
    except OSError as e:
        log.warning("could not delete unreferenced files under %s: %s", output, e)
    result = PreprocessResult(manifest, summary_table(manifest))
    echo(result.summary)
    if not result.ok:
        raise QuarantineLimitExceeded(
            f"{manifest.quarantined} of {manifest.read} samples quarantined "
            f"({manifest.quarantine_fraction:.1%}), over the limit {config.max_quarantine_fraction:.1%}; "
            f"see {output.rstrip('/')}/{QUARANTINE}/"
        )
    return result


def fingerprint_mixture(mixture: Mixture, config: PreprocessConfig, output: str, address: str | None = None) -> str:
    """What `manifest.json` would record as `input_fingerprint` for this input and config, without processing:
    the read, select and hash stages on the cluster, in a work folder under `output` that is removed after."""
    store = Store(output)
    store.check_writable()
    stages = _Stages(store, config, address)
    try:
        read = stages.read(mixture)
        diffs = stages.diff(read, None, [], fingerprint_only=True)
    finally:
        stages.remove_work()
    return _fingerprint_hex(d["fingerprint"] for d in diffs)


def _fingerprint_hex(parts) -> str:
    return f"{sum(int(x, 16) for x in parts) % (1 << 256):064x}"


@dataclass
class _Read:
    partitions: int
    bits: int
    available: dict[str, int]
    cuts: dict[str, list]


class _Stages:
    """The Ray Data stages of one run, each over a few small items (chunks, partitions, units), returning one
    aggregate per item; `in_process`, the same functions over the same items in this process, one after another."""

    def __init__(self, store: Store, config: PreprocessConfig, address: str | None, in_process: bool = False) -> None:
        self.store, self.config, self.in_process = store, config, in_process
        self.work = f"{WORK}/run-{uuid.uuid4().hex[:12]}"
        self.partitions = 1
        self.secrets = None  # in process, the functions read this process's own credentials
        if not in_process:
            import ray.data  # noqa: F401  (before Ray starts: ensure_ray then keeps Ray Data's plans off the console)

            from pipelines.ray_runtime import ensure_ray, share_secrets

            ensure_ray(address)
            self.secrets = share_secrets()

    def run(self, fn, items: list[dict[str, Any]], **kwargs) -> list[dict[str, Any]]:
        if not items:
            return []
        kwargs = {"output": self.store.uri, "secrets": self.secrets, **kwargs}
        if self.in_process:
            rows = [fn(dict(item), **kwargs) for item in items]
        else:
            import ray

            from pipelines.ray_runtime import worker_runtime_env

            ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
                fn, fn_kwargs=kwargs, runtime_env=worker_runtime_env()
            )
            rows = ds.take_all()
        results = [json.loads(row["result"]) for row in rows]
        errors = sorted({r["error"] for r in results if "error" in r})
        if errors:
            raise SourceError("; ".join(errors))
        return results

    def read(self, mixture: Mixture) -> _Read:
        files = []
        for source in mixture.sources:
            files.append((source, annotations.file_size(source.annotations), annotations.file_kind(source.annotations)))
        bits = partition.partition_bits(sum(size for _, size, _ in files))
        chunks, jsonl = [], []
        for source, size, kind in files:
            selecting = source.ratio < 1.0 or source.cap is not None
            ranges = annotations.split(size, partition.CHUNK_BYTES) if kind == "jsonl" else [(0, size)]
            for start, stop in ranges:
                chunk = {
                    "chunk": len(chunks),
                    "source": source.name,
                    "uri": source.annotations,
                    "image_root": source.image_root,
                    "kind": kind,
                    "start": start,
                    "stop": stop,
                    "first_line": 1,
                    "selecting": selecting,
                }
                chunks.append(chunk)
                if kind == "jsonl":
                    jsonl.append(chunk)
        lines = {r["chunk"]: r["lines"] for r in self.run(partition.count_chunk, [dict(c) for c in jsonl])}
        next_line: dict[str, int] = {}
        for c in jsonl:  # chunks of a file are in byte order
            c["first_line"] = next_line.get(c["uri"], 1)
            next_line[c["uri"]] = c["first_line"] + lines[c["chunk"]]
        done = self.run(partition.read_chunk, chunks, work=self.work, bits=bits, seed=self.config.seed)
        available: Counter[str] = Counter()
        hists: dict[str, np.ndarray] = {}
        for r in done:
            available[r["source"]] += r["records"]
            if r["hist"] is not None:
                hist = hists.setdefault(r["source"], np.zeros(partition.PICK_BINS, dtype=np.int64))
                np.add.at(hist, r["hist"], r["hist_counts"])
        cuts = self.cuts(mixture, available, hists, 1 << bits)
        self.partitions = 1 << bits
        return _Read(1 << bits, bits, {s.name: available[s.name] for s in mixture.sources}, cuts)

    def cuts(self, mixture: Mixture, available: Counter, hists: dict[str, np.ndarray], partitions: int) -> dict:
        """Per sampled source, the largest (pick, line) kept: `ratio` of its records (rounded up), at most `cap`."""
        wanted, ranks = {}, {}
        for source in mixture.sources:
            k = available[source.name]
            if source.ratio < 1.0:
                k = math.ceil(source.ratio * k)
            if source.cap is not None:
                k = min(k, source.cap)
            if source.name in hists and k < available[source.name]:
                if k == 0:
                    wanted[source.name], ranks[source.name] = -1, 0
                    continue
                wanted[source.name], ranks[source.name] = partition.selection_bin(hists[source.name], k)
        if not wanted:
            return {}
        found: dict[str, list] = {}
        looking = {s: b for s, b in wanted.items() if b >= 0}
        for r in self.run(
            partition.picks_in_bin, [{"p": p} for p in range(partitions)], work=self.work, wanted=looking
        ):
            for source, picks in r.items():
                found.setdefault(source, []).extend(map(tuple, picks))
        return {s: list(sorted(found[s])[ranks[s] - 1]) if b >= 0 else ["", -1] for s, b in wanted.items()}

    def diff(self, read: _Read, prior: dict | None, on_disk: list[str], fingerprint_only: bool = False) -> list[dict]:
        c = self.config
        layout = f"{c.shard_rows}:{c.shard_bytes}:{c.row_group_rows}:{c.row_group_bytes}"
        items = [{"p": p} for p in range(read.partitions)]
        return sorted(
            self.run(
                partition.diff_partition,
                items,
                work=self.work,
                bits=read.bits,
                cuts=read.cuts,
                config_hash=c.output_hash(),
                previous=prior,
                on_disk=on_disk,
                unit_size=c.unit_size,
                layout=layout,
                fingerprint_only=fingerprint_only,
            ),
            key=lambda d: d["p"],
        )

    def process(self, units: list[tuple]) -> list[dict[str, Any]]:
        """One result per unit, in the order given: its parts, a failure message or "", how many samples it
        found finished by an earlier run."""
        from pipelines.worker import UnitProcessor  # torch and a tokenizer: the actors import them, not the driver

        items = [
            {"i": i, "todo": partition.work_file(self.work, "todo", p), "group": g, "unit": unit, "work_root": WORK}
            for i, (p, g, unit, _) in enumerate(units)
        ]
        if self.in_process:
            processor = UnitProcessor(self.config.to_dict(), self.store.uri)
            return [json.loads(processor(item)["result"]) for item in items]
        import ray
        from ray.data import ActorPoolStrategy

        from pipelines.ray_runtime import worker_runtime_env

        # the cluster's CPUs, not those free now: the stage before may not have handed its CPU back yet
        workers, threads = self.config.actors(max(1, int(ray.cluster_resources().get("CPU", 1))))
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map(
            UnitProcessor,
            fn_constructor_kwargs={
                "config": self.config.to_dict(),
                "output": self.store.uri,
                "secrets": self.secrets,
                "threads": threads,
            },
            compute=ActorPoolStrategy(size=min(workers, len(items))),  # a fixed pool: every actor loads at once
            num_cpus=threads,
            runtime_env=worker_runtime_env(),
        )
        by_item = {row["i"]: json.loads(row["result"]) for row in ds.take_all()}
        return [by_item[i] for i in range(len(items))]

    def tasks(self, fn, calls: list[tuple]) -> list[Callable[[], Any]]:
        """`fn(*args)` for each args of `calls`, as Ray tasks started at once (in process: run when asked for);
        one function per call that returns its result or raises its error."""
        if self.in_process:
            return [functools.partial(fn, *args) for args in calls]
        import ray

        from pipelines.ray_runtime import worker_runtime_env

        task = ray.remote(fn).options(runtime_env=worker_runtime_env())
        return [functools.partial(ray.get, task.remote(*args)) for args in calls]

    def merge(self, parts: list[dict[str, Any]]) -> dict[str, str]:
        """part path → the shard file it was merged into (a part left alone, or whose merge failed, is absent)."""
        from pipelines.worker import merge_parts

        try:
            sizes = {path: info.size for path, info in self.store.listing(SHARDS_DIR).items()}
        except OSError as e:
            log.warning("not merging part files: listing %s/%s failed: %s", self.store.uri, SHARDS_DIR, e)
            return {}
        groups = _merge_groups(parts, sizes, self.config.shard_rows, self.config.shard_bytes)
        c = self.config
        calls = [
            (self.store.uri, bucket, paths, c.row_group_rows, c.row_group_bytes, self.secrets)
            for bucket, paths in groups
        ]
        merged: dict[str, str] = {}
        for (bucket, paths), result in zip(groups, self.tasks(merge_parts, calls), strict=True):
            try:
                path = result()
            except Exception as e:  # the task's error (Ray's RayError wraps it); the parts stay usable
                log.warning(
                    "bucket %s: merging %d part files %s failed, keeping them: %s", bucket, len(paths), paths, e
                )
                continue
            merged.update(dict.fromkeys(paths, path))
        return merged

    def drop_stale_rows(self, affected: list[str]) -> dict[str, str]:
        """Rewrite each shard that holds a removed or changed sample without it (other shards stay untouched);
        returns old path → new path ("" when no row is left)."""
        from pipelines.worker import drop_rows

        if not affected:
            return {}
        c = self.config
        batches = [affected[i :: max(1, min(len(affected), 16))] for i in range(min(len(affected), 16))]
        calls = [
            (self.store.uri, batch, self.work, self.partitions, c.row_group_rows, c.row_group_bytes, self.secrets)
            for batch in batches
        ]
        return {old: new for result in self.tasks(drop_rows, calls) for old, new in result().items()}

    def index(self, version: str, units_of: dict[int, list[str]], part_map: dict, shard_map: dict) -> list[dict]:
        items = [{"p": p, "units": units_of.get(p, [])} for p in range(self.partitions)]
        return self.run(
            partition.index_partition,
            items,
            work=self.work,
            units_dir=UNITS,
            index=version,
            bits=int(math.log2(self.partitions)),
            part_map=part_map,
            shard_map=shard_map,
            max_length=self.config.max_length,
        )

    def remove_work(self) -> None:
        for path in self.store.list_files(self.work):
            self.store.delete(path)


def _stop(store: Store, done: int, failures: list[str], total: int, after: str) -> None:
    more = f" (and {len(failures) - 1} more failed units)" if len(failures) > 1 else ""
    raise OutputError(
        f"output {store.uri}: preprocessing stopped, {total - done} of {total} samples not done: "
        f"{failures[0]}{more}; the {done} samples finished are kept in their shard files and a rerun "
        f"processes only the rest. {after}"
    )


def _merge_groups(
    parts: list[dict[str, Any]], sizes: dict[str, int], max_rows: int, max_bytes: int
) -> list[tuple[str, list[str]]]:
    """(bucket, part paths) of each merge: per bucket, the parts (`{path, bucket, rows, first}` with `first` their
    first key) ordered by first key, cut greedily into consecutive runs of at most `max_rows` rows and `max_bytes`
    file bytes (`sizes`); runs of one part are left out (nothing to merge). A pure function of the parts, so of the
    samples, unit_size and the limits.

    >>> part = lambda n, first, rows: {"path": f"p{n}", "bucket": "text", "rows": rows, "first": first}
    >>> parts = [part(1, "a", 2), part(3, "d", 2), part(2, "c", 1)]
    >>> _merge_groups(parts, {"p1": 100, "p2": 100, "p3": 100}, max_rows=4, max_bytes=1000)
    [('text', ['p1', 'p2'])]
    """
    by_bucket: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        if part["path"] in sizes:  # a part that is not there (never expected) stays out of every merge
            by_bucket.setdefault(part["bucket"], []).append(part)
    groups = []
    for bucket, found in sorted(by_bucket.items()):
        runs: list[list[str]] = []
        rows = size = 0
        for part in sorted(found, key=lambda x: (x["first"], x["path"])):
            n, nbytes = part["rows"], sizes[part["path"]]
            if runs and rows + n <= max_rows and size + nbytes <= max_bytes:
                runs[-1].append(part["path"])
                rows, size = rows + n, size + nbytes
            else:
                runs.append([part["path"]])
                rows, size = n, nbytes
        groups.extend((bucket, run) for run in runs if len(run) > 1)
    return groups


def _manifest(
    aggregates: list[dict], read: _Read, diffs: list[dict], config: PreprocessConfig, version: str, run: RunCounts
) -> Manifest:
    sources = {}
    for name, available in read.available.items():
        chosen = sum(d["read"].get(name, 0) for d in diffs)
        written = sum(a["written"].get(name, 0) for a in aggregates)
        quarantined = sum(a["quarantined"].get(name, 0) for a in aggregates)
        sources[name] = SourceCounts(available, chosen, written, quarantined)
    written = sum(s.written for s in sources.values())
    quarantined = sum(s.quarantined for s in sources.values())
    total = sum(a["entries"] for a in aggregates)
    shards: Counter[str] = sum((Counter(a["shards"]) for a in aggregates), Counter())
    pixels = sum(a["pixels"] for a in aggregates)
    lengths = _sum_lists(aggregates, "lengths")
    from pipelines.report import length_histogram

    edges = length_histogram([], config.max_length)["edges"]
    return Manifest(
        read=total,
        written=written,
        quarantined=quarantined,
        reconciled=written + quarantined == total,
        quarantine_fraction=quarantined / total if total else 0.0,
        buckets=dict(sorted(sum((Counter(a["buckets"]) for a in aggregates), Counter()).items())),
        sources=sources,
        quarantine_reasons=dict(sorted(sum((Counter(a["reasons"]) for a in aggregates), Counter()).items())),
        input_fingerprint=_fingerprint_hex(a["fingerprint"] for a in aggregates),
        config=config,
        config_hash=config.output_hash(),
        code_version=code_version(),
        padded_pixel_fraction=math.fsum(a["padded"] for a in aggregates) / pixels if pixels else 0.0,
        token_length_histogram={"edges": edges, "counts": lengths},
        visual_tokens=sum(a["visual_tokens"] for a in aggregates),
        shards=[ShardFile(p, shard_bucket(p), n) for p, n in sorted(shards.items())],
        run=run,
        mean_length=sum(a["length_sum"] for a in aggregates) / written if written else 0.0,
        index=version,
        index_partitions=read.partitions,
    )


def _sum_lists(aggregates: list[dict], key: str) -> list[int]:
    return np.sum([a[key] for a in aggregates], axis=0).astype(int).tolist()


def _clean_up(store: Store, manifest: Manifest, partitions: int) -> None:
    """Delete what the new manifest does not reference: shard files (merged parts, dropped shards), other index
    versions, quarantine parts of partitions that no longer exist, and the work folder."""
    keep = {s.path for s in manifest.shards}
    for path in store.list_files(SHARDS_DIR):
        if path not in keep:
            store.delete(path)
    for path in store.list_files(INDEX_DIR):
        if not path.startswith(f"{manifest.index}/"):
            store.delete(path)
    for path in store.list_files(QUARANTINE):
        if int(path.rsplit("part-", 1)[1].split(".")[0]) >= partitions:
            store.delete(path)
    for path in store.list_files(WORK):
        store.delete(path)

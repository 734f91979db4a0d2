"""The per-sample work of preprocessing, run inside Ray Data actors.

One work unit = a sorted list of records. For each record: read the image bytes → decode (EXIF rotation,
any mode → RGB, bomb and size limits) → choose its bucket → resize/pad → re-encode → tokenize with the
template (labels, `<image>` expansion, preflight). Rows are grouped by bucket and each group is written as
one Parquet "part" file (more when it is over the shard size) named by the hash of its rows' content hashes, so
identical input gives identical files. Every record ends as exactly one index entry: `written` (with its shard) or
`quarantined` (with a reason). `merge_parts`, a Ray task, later merges a bucket's small parts into one shard file.
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from convllava.data.shards import (
    INDEX_SCHEMA,
    SHARD_SCHEMA,
    TEXT_BUCKET,
    row_group_bounds,
    shard_bucket,
    shard_path,
    write_parquet,
    write_shard,
    written_entry,
)
from convllava.io.storage import Store, read_bytes
from convllava.processing.image_processing import ImageError, ImageProcessorConfig, load_image
from convllava.processing.labels import PreflightError, SequenceTooLongError
from convllava.processing.processor import ConvLlavaProcessor
from convllava.processing.processor_config import ProcessorConfig
from convllava.processing.templates import ConversationError
from convllava.processing.tokenizer import load_tokenizer
from pipelines.config import PreprocessConfig
from pipelines.ray_runtime import adopt_secrets


class Quarantined(Exception):
    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


def build_processor(config: PreprocessConfig) -> ConvLlavaProcessor:
    return ConvLlavaProcessor(
        load_tokenizer(config.tokenizer),
        ProcessorConfig(
            template=config.template,
            max_length=config.max_length,
            truncation="error" if config.too_long == "quarantine" else "truncate",
            tokenization=config.tokenization,
            image=ImageProcessorConfig(resolution=config.resolution, mode=config.mode),
        ),
    )


class UnitProcessor:
    """Ray Data actor: holds the tokenizer/processor and the output store across units, and works on `threads`
    samples of a unit at once (Pillow releases the GIL while it decodes, resizes and encodes)."""

    def __init__(
        self, config: dict[str, Any], output: str, secrets: dict[str, Any] | None = None, threads: int = 1
    ) -> None:
        adopt_secrets(secrets)  # credentials for an s3:// output or image root; see pipelines.ray_runtime
        self.config = PreprocessConfig(**config)
        self.processor = build_processor(self.config)
        self.store = Store(output)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="preprocess") if threads > 1 else None
        self.tokenizing = threading.Lock()  # a fast tokenizer's settings are shared state: one call at a time

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """One work unit: row group `group` of the partition's todo file → {i, result: JSON of {parts, failed,
        resumed}}. A unit finished by an earlier, interrupted run (its record `units/<unit>.parquet` is there, and
        so are its parts) is not redone."""
        return {"i": row["i"], "result": json.dumps(self.unit(row))}

    def unit(self, row: dict[str, Any]) -> dict[str, Any]:
        done_path = f"{row['work_root']}/units/{row['unit']}.parquet"
        resumed = self.finished(done_path)
        if resumed is not None:
            return {"parts": part_aggregates(resumed), "failed": "", "resumed": len(resumed)}
        with self.store.fs.open_input_file(self.store.path(row["todo"])) as f:
            records = pq.ParquetFile(f).read_row_group(row["group"]).to_pylist()
        done = self.pool.map(self.sample, records) if self.pool else map(self.sample, records)
        entries, rows = [], []
        for entry, sample in done:  # in record order, whatever order the threads finished in
            entries.append(entry)
            if sample is not None:
                rows.append(sample)
        try:
            shard_of = self.write_parts(rows)
            for entry in entries:
                if entry["status"] == "written":
                    entry["shard"] = shard_of[entry["key"]]
            write_parquet(self.store, done_path, pa.Table.from_pylist(entries, schema=INDEX_SCHEMA))
        except OSError as e:  # a full disk, lost permissions, a storage outage: this unit is not done
            failed = (
                f"writing the shards of {len(records)} samples ({records[0]['key']} …) "
                f"to {self.store.uri} failed: {type(e).__name__}: {e}"
            )
            return {"parts": [], "failed": failed, "resumed": 0}
        return {"parts": part_aggregates(entries), "failed": "", "resumed": 0}

    def finished(self, path: str) -> list[dict[str, Any]] | None:
        """The entries of a unit an earlier run finished, when its record and every part it names are there."""
        try:
            entries = self.store.read_table(path).to_pylist()
        except (OSError, ValueError):  # not there, or cut short (pyarrow's ArrowInvalid is a ValueError)
            return None
        shards = {e["shard"] for e in entries if e["shard"]}
        return entries if all(self.store.exists(s) for s in shards) else None

    def write_parts(self, rows: list[dict[str, Any]]) -> dict[str, str]:
        """One part file per bucket (several when its rows pass `shard_rows` or `shard_bytes` of images), rows
        sorted by key, row groups cut by the config; returns key → part path."""
        c = self.config
        by_bucket: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_bucket.setdefault(r["bucket"], []).append(r)
        shard_of = {}
        for bucket, group in sorted(by_bucket.items()):
            group.sort(key=lambda r: r["key"])
            bounds = row_group_bounds([len(r["image"] or b"") for r in group], c.shard_rows, c.shard_bytes)
            for start, stop in itertools.pairwise(bounds):
                part = group[start:stop]
                path = shard_path(bucket, [r["content_hash"] for r in part])
                table = pa.Table.from_pylist(part, schema=SHARD_SCHEMA)
                write_shard(self.store, path, table, c.row_group_rows, c.row_group_bytes)
                shard_of.update({r["key"]: path for r in part})
        return shard_of

    def sample(self, rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """One record's index entry, and its shard row (None when it is quarantined)."""
        entry = {k: rec[k] for k in ("key", "id", "source", "line", "content_hash")}
        try:
            sample = self.process(rec)
        except Quarantined as q:
            entry.update(status="quarantined", shard=None, category=q.category, reason=q.reason, record=rec["raw"])
            return entry, None
        entry.update(written_entry(sample))
        return entry, sample

    def process(self, rec: dict[str, Any]) -> dict[str, Any]:
        if rec.get("category"):
            raise Quarantined(rec["category"], rec["reason"])
        sid = rec["key"]
        image_sizes, encoded, orig, placement = [], None, (0, 0), None
        if rec.get("image_uri"):
            image = self.decode(rec["image_uri"], rec["image"])
            orig = image.size
            resized, placement = self.processor.image_processor.resize(image)
            image_sizes = [(placement.canvas_height, placement.canvas_width)]
            encoded = self.encode(resized)
        try:
            with self.tokenizing:
                sample = self.processor.tokenize(json.loads(rec["conversations"]), image_sizes, sample_id=sid)
        except ConversationError as e:
            raise Quarantined("malformed_record", str(e)) from None
        except SequenceTooLongError as e:
            raise Quarantined("too_long", str(e)) from None
        except PreflightError as e:
            raise Quarantined("preflight", str(e)) from None
        p = placement
        return {
            "key": sid,
            "id": rec["id"],
            "source": rec["source"],
            "line": rec["line"],
            "bucket": f"{p.canvas_height}x{p.canvas_width}" if p else TEXT_BUCKET,
            "image": encoded,
            "height": p.canvas_height if p else 0,
            "width": p.canvas_width if p else 0,
            "orig_height": orig[1],
            "orig_width": orig[0],
            "content_box": [p.offset_x, p.offset_y, p.content_width, p.content_height] if p else [],
            "padded_fraction": p.padded_fraction if p else 0.0,
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "num_image_tokens": sample.num_image_tokens,
            "length": len(sample.input_ids),
            "num_label_tokens": sample.num_label_tokens,
            "truncated": sample.truncated,
            "content_hash": rec["content_hash"],
        }

    def decode(self, uri: str, relative: str) -> Image.Image:
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            raise Quarantined("missing_file", f"image {relative} not found") from None
        except IsADirectoryError:
            raise Quarantined("missing_file", f"image {relative} is a directory") from None
        except OSError as e:
            raise Quarantined("missing_file", f"image {relative} cannot be read ({e})") from None
        try:
            image = load_image(data, max_pixels=self.config.max_pixels, background=self.processor.image_processor.fill)
        except ImageError as e:
            reason = str(e).replace("<bytes>", relative)
            category = (
                "decompression_bomb"
                if "exceeds the limit" in reason or "bomb" in reason
                else ("empty_file" if "empty" in reason else "unreadable_image")
            )
            raise Quarantined(category, reason) from None
        if min(image.size) < self.config.min_image_side:
            raise Quarantined(
                "too_small",
                f"image {relative} is {image.size[0]}x{image.size[1]}, under the minimum side {self.config.min_image_side}",
            )
        return image

    def encode(self, image: Image.Image) -> bytes:
        return encode_image(image, self.config.image_format, self.config.jpeg_quality)


def part_aggregates(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """{path, bucket, rows, first} of each part file a unit's entries point at (what the merge phase groups by)."""
    parts: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e["shard"]:
            part = parts.setdefault(
                e["shard"], {"path": e["shard"], "bucket": e["bucket"], "rows": 0, "first": e["key"]}
            )
            part["rows"] += 1
            part["first"] = min(part["first"], e["key"])
    return list(parts.values())


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    """The bytes a shard stores for a model-input-sized image. `png` is lossless: training reads back exactly the
    pixels the processor produced (for `square`, the released models' pixels); `jpeg` trades that for size."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        image.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def merge_parts(
    output: str,
    bucket: str,
    parts: list[str],
    row_group_rows: int,
    row_group_bytes: int,
    secrets: dict[str, Any] | None = None,
) -> str:
    """Ray task: one shard file of `bucket` holding the rows of `parts` (paths under `output`), sorted by key, named
    by its rows' content hashes like any shard; returns its path. The parts stay: the driver drops them once the
    index points at the merged file, and keeps them when this fails (smaller files, the same rows)."""
    adopt_secrets(secrets)  # credentials for an s3:// output; see pipelines.ray_runtime
    store = Store(output)
    table = pa.concat_tables([store.read_table(p).cast(SHARD_SCHEMA) for p in parts])
    table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))
    path = shard_path(bucket, table.column("content_hash").to_pylist())
    write_shard(store, path, table, row_group_rows, row_group_bytes)
    return path


def drop_rows(
    output: str,
    shards: list[str],
    work: str,
    partitions: int,
    row_group_rows: int,
    row_group_bytes: int,
    secrets: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Ray task: each of `shards` rewritten without the rows the run's `removed` files name for it, under the name
    of its remaining rows (deleted when none is left); returns old path → new path ("" for none)."""
    from pipelines.partition import removed_keys

    adopt_secrets(secrets)
    store = Store(output)
    drop = removed_keys(store, work, partitions, set(shards))
    moved = {}
    for path in shards:
        table = store.read_table(path)
        table = table.filter(
            pc.invert(pc.is_in(table["key"], value_set=pa.array(sorted(drop.get(path, ())), pa.string())))
        )
        if table.num_rows == 0:
            moved[path] = ""
            continue
        new_path = shard_path(shard_bucket(path), table["content_hash"].to_pylist())
        write_shard(store, new_path, table, row_group_rows, row_group_bytes)
        moved[path] = new_path
    return moved

"""PreprocessConfig: how samples become shards, recorded in every output's manifest (`convllava.data.shards.Manifest`).

It lives in the library, next to the shard format, because the library reads it back: training checks the shards
against its processor with it (`Manifest.config`). `pipelines.config` loads it from YAML with the mixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import model_validator

from convllava.io.config import ConfigLoadError, ConfigModel, Overrides, load_yaml_mapping, stable_hash
from convllava.processing.buckets import Mode, check_resolution
from convllava.processing.templates import TEMPLATES, Tokenization

TooLong = Literal["truncate", "quarantine"]
TOO_LONG: tuple[str, ...] = get_args(TooLong)
ImageFormat = Literal["jpeg", "png"]
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)

# Shard file sizes (preprocessing's defaults): a shard file holds at most SHARD_ROWS rows and about SHARD_BYTES of
# images; inside it, a row group (what a training rank reads in one request) at most ROW_GROUP_ROWS rows and
# ROW_GROUP_BYTES of images.
SHARD_ROWS, SHARD_BYTES = 10_000, 256 << 20
ROW_GROUP_ROWS, ROW_GROUP_BYTES = 1024, 32 << 20

MAX_ACTORS, MAX_THREADS = 8, 8  # the default preprocessing pool: up to 8 actors, then up to 8 threads each
# Fields `output_hash` leaves out: when the job fails, how the work is scheduled and how rows are cut into files,
# never what a row holds (changing them keeps an output's samples valid).
LAYOUT_FIELDS = (
    "max_quarantine_fraction",
    "unit_size",
    "workers",
    "threads",
    "shard_rows",
    "shard_bytes",
    "row_group_rows",
    "row_group_bytes",
)


class PreprocessConfig(ConfigModel):
    """How samples become shards.

    Args:
        resolution: token budget (R/64)² per image; buckets span 1:4..4:1 aspect ratios under it.
        mode: `bucket` (default), `square` (the paper's) or `short-side`.
        tokenizer: `tiny`, a local tokenizer directory or an `s3://` prefix.
        template: conversation template (`vicuna_v1`, `plain`, `chatml`).
        tokenization: `one_pass` (our models) or `llava` (LLaVA's per-chunk `tokenizer_image_token`, the tokens the
            released LLaVA-trained checkpoints saw; for fine-tuning one of those).
        max_length: maximum tokens per sample, visual tokens included.
        too_long: `truncate` (never through an image) or `quarantine`.
        max_pixels: images with more pixels are refused before decoding (decompression bombs).
        min_image_side: images whose shorter side is smaller are quarantined as too small to be useful.
        image_format: re-encoding of the bucket-sized image (`jpeg` or `png`).
        jpeg_quality: JPEG quality when re-encoding.
        max_quarantine_fraction: the job fails (after writing everything) when more samples are quarantined.
        unit_size: samples per work unit (one Ray task; one part file per bucket it touches, merged afterwards).
        shard_rows: rows per shard file at most: a unit cuts its rows of a bucket into part files under these
            limits, then consecutive parts of a bucket merge into shard files under them.
        shard_bytes: bytes per shard file at most (image bytes when a unit cuts its parts, file bytes when parts
            merge; one larger image makes a file of its own).
        row_group_rows: at most this many rows per Parquet row group (what a training rank reads in one request).
        row_group_bytes: at most this many image bytes per row group (one larger image makes a group of its own).
        workers: Ray Data actors doing the work (default: Ray's CPUs / `threads`).
        threads: samples each actor works on at once, one thread each (decoding, resizing and encoding release the
            GIL), and the CPUs it asks Ray for. Default: Ray's CPUs / `workers`; with neither given, one thread per
            actor up to 8 actors, then more threads (at most 8) rather than more actors: on 64 CPUs 8 processes
            start, import and hold a tokenizer instead of 64; on a few CPUs every actor starts at once.
        seed: for mixture sampling.
    """

    resolution: int = 768
    mode: Mode = "bucket"
    tokenizer: str = "tiny"
    template: str = "vicuna_v1"
    tokenization: Tokenization = "one_pass"
    max_length: int = 2048
    too_long: TooLong = "truncate"
    max_pixels: int = 64_000_000
    min_image_side: int = 32
    image_format: ImageFormat = "jpeg"
    jpeg_quality: int = 95
    max_quarantine_fraction: float = 0.1
    unit_size: int = 256
    shard_rows: int = SHARD_ROWS
    shard_bytes: int = SHARD_BYTES
    row_group_rows: int = ROW_GROUP_ROWS
    row_group_bytes: int = ROW_GROUP_BYTES
    workers: int | None = None
    threads: int | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        # `mode`, `tokenization`, `too_long` and `image_format` are checked by their Literal types.
        def fail(name: str, why: str) -> None:
            raise ValueError(f"preprocess config: {name}: {why}")

        try:
            check_resolution(self.resolution)
        except ValueError as e:
            fail("resolution", str(e))
        if self.template not in TEMPLATES:
            fail("template", f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        if self.max_length < 8:
            fail("max_length", f"must be >= 8, got {self.max_length}")
        if self.max_pixels < 64 * 64:
            fail("max_pixels", f"must be >= 4096, got {self.max_pixels}")
        if self.min_image_side < 1:
            fail("min_image_side", f"must be >= 1, got {self.min_image_side}")
        if not 1 <= self.jpeg_quality <= 100:
            fail("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            fail("max_quarantine_fraction", f"must be in [0, 1], got {self.max_quarantine_fraction}")
        for name in ("unit_size", "shard_rows", "shard_bytes", "row_group_rows", "row_group_bytes"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            fail("workers", f"must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            fail("threads", f"must be >= 1, got {self.threads}")
        return self

    def actors(self, cpus: int) -> tuple[int, int]:
        """(actors, threads per actor) on a cluster with `cpus` CPUs (see `workers` and `threads`)."""
        if self.threads:
            threads = self.threads
        elif self.workers:
            threads = max(1, min(MAX_THREADS, cpus // self.workers))
        else:
            threads = min(MAX_THREADS, -(-cpus // MAX_ACTORS))
        return self.workers or max(1, cpus // threads), threads

    def output_hash(self) -> str:
        """Hash of the fields that change what a shard row holds (not how the work is scheduled or the files cut)."""
        content: dict[str, Any] = {k: v for k, v in self.to_dict().items() if k not in LAYOUT_FIELDS}
        if content["tokenization"] == "one_pass":  # the default before the option existed: old shards stay valid
            del content["tokenization"]
        return stable_hash(content)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Overrides | None = None, **fields: Any) -> PreprocessConfig:
        """A preprocess YAML, or the `preprocess` section of a mixture YAML; then `fields` that are not None (the
        command line's options), then `overrides` (`key=value`)."""
        data = load_yaml_mapping(path)
        where = f"{path}: preprocess" if "preprocess" in data else str(path)
        data = data.get("preprocess", data)
        if not isinstance(data, dict):
            raise ConfigLoadError(f"{where}: expected a mapping, got {type(data).__name__}")
        return cls.from_dict({**data, **{k: v for k, v in fields.items() if v is not None}}, where, overrides)

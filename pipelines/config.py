"""Preprocessing configuration and data mixtures: typed, validated, loaded from YAML with unknown keys refused.

A mixture names several sources, each an annotation file (LLaVA JSON list or JSONL) with its image root, and
optionally how much of it to use — `ratio` (a fraction, chosen deterministically by hashed sample id) and/or
`cap` (at most this many samples), as LLaVA-NeXT's data mixtures do:

    sources:
      - {name: captions, annotations: captions.json, image_root: ., ratio: 1.0}
      - {name: instruct, annotations: instruct.jsonl, image_root: ., cap: 5000}

Relative paths are relative to the YAML file's folder; `s3://` URIs are used as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from convllava.buckets import MODES, Mode, check_resolution
from convllava.config_loader import ConfigLoadError, load, load_yaml_mapping
from convllava.shards import ROW_GROUP_BYTES, ROW_GROUP_ROWS, SHARD_BYTES, SHARD_ROWS
from convllava.storage import is_s3
from convllava.templates import TEMPLATES, TOKENIZATIONS, Tokenization

TooLong = Literal["truncate", "quarantine"]
TOO_LONG: tuple[str, ...] = get_args(TooLong)
ImageFormat = Literal["jpeg", "png"]
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)


class ConfigError(ConfigLoadError):
    """A configuration value or key that is not accepted; the message names it and the file."""


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


@dataclass(frozen=True)
class PreprocessConfig:
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

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ConfigError(f"preprocess config: {name}: {why}")

        try:
            check_resolution(self.resolution)
        except ValueError as e:
            fail("resolution", str(e))
        if self.mode not in MODES:
            fail("mode", f"must be one of {MODES}, got {self.mode!r}")
        if self.template not in TEMPLATES:
            fail("template", f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        if self.tokenization not in TOKENIZATIONS:
            fail("tokenization", f"must be one of {TOKENIZATIONS}, got {self.tokenization!r}")
        if self.max_length < 8:
            fail("max_length", f"must be >= 8, got {self.max_length}")
        if self.too_long not in TOO_LONG:
            fail("too_long", f"must be one of {TOO_LONG}, got {self.too_long!r}")
        if self.max_pixels < 64 * 64:
            fail("max_pixels", f"must be >= 4096, got {self.max_pixels}")
        if self.min_image_side < 1:
            fail("min_image_side", f"must be >= 1, got {self.min_image_side}")
        if self.image_format not in IMAGE_FORMATS:
            fail("image_format", f"must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
        content = {k: v for k, v in self.to_dict().items() if k not in LAYOUT_FIELDS}
        if content["tokenization"] == "one_pass":  # the default before the option existed: old shards stay valid
            del content["tokenization"]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PreprocessConfig:
        """A preprocess YAML, or the `preprocess` section of a mixture YAML; `overrides` that are not None win."""
        data = load_yaml_mapping(path, ConfigError)
        where = f"{path}: preprocess" if "preprocess" in data else str(path)
        data = data.get("preprocess", data)
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}}, where=where)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> PreprocessConfig:
        return load(cls, data, where, ConfigError)


@dataclass(frozen=True)
class Source:
    """One annotation file with its image root, and how much of it the mixture uses."""

    name: str
    annotations: str
    image_root: str
    ratio: float = 1.0
    cap: int | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"source name {self.name!r}: use letters, digits, '-', '_' or '.'")
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"source {self.name}: ratio must be in (0, 1], got {self.ratio}")
        if self.cap is not None and self.cap < 0:
            raise ConfigError(f"source {self.name}: cap must be >= 0, got {self.cap}")


@dataclass(frozen=True)
class Mixture:
    sources: tuple[Source, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("a mixture needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"source names must be unique, got {names}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Mixture:
        """A mixture YAML (`sources`, and optionally a `preprocess` section that PreprocessConfig reads); relative
        paths are relative to the YAML's folder."""
        data = load_yaml_mapping(path, ConfigError)
        data.pop("preprocess", None)
        return load(cls, data, str(path), ConfigError).resolved(Path(path).parent)

    def resolved(self, base: Path | str) -> Mixture:
        """The sources' relative `annotations` and `image_root` made absolute under `base` (a folder or an `s3://`
        prefix); s3:// URIs and absolute paths stay."""
        sources = (
            dataclasses.replace(s, annotations=_resolve(base, s.annotations), image_root=_resolve(base, s.image_root))
            for s in self.sources
        )
        return Mixture(tuple(sources))

    @classmethod
    def from_files(cls, annotations: list[str], image_root: str) -> Mixture:
        """Sources named after the annotation files, all sharing one image root."""
        names: list[str] = []
        for a in annotations:
            stem = Path(a.rstrip("/")).name.split(".")[0] or "data"
            name, n = stem, 2
            while name in names:
                name, n = f"{stem}-{n}", n + 1
            names.append(name)
        return cls(tuple(Source(n, a, image_root) for n, a in zip(names, annotations, strict=True)))


def _resolve(base: Path | str, value: str) -> str:
    if is_s3(value) or Path(value).is_absolute():
        return value
    if is_s3(base):
        return posixpath.normpath(f"{str(base).rstrip('/')}/{value}").replace("s3:/", "s3://", 1)
    return str((Path(base) / value).resolve())

"""Preprocessing configuration and data mixtures: typed, validated, loaded from YAML with unknown keys refused.

A mixture names several sources, each an annotation file (LLaVA JSON list or JSONL) with its image root, and
optionally how much of it to use — `ratio` (a fraction, chosen deterministically by hashed sample id) and/or
`cap` (at most this many samples), as LLaVA-NeXT's data mixtures do:

    sources:
      - {name: captions, annotations: captions.json, image_root: ., ratio: 1.0}
      - {name: instruct, annotations: instruct.jsonl, image_root: ., cap: 5000}

Relative paths are relative to the YAML file's folder; `s3://` URIs are used as they are. `PreprocessConfig` lives
in the library (`convllava.data.preprocess_config`: every output's manifest records it) and is re-exported here.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from pydantic import model_validator

from convllava.data.preprocess_config import PreprocessConfig
from convllava.io.config import ConfigModel, load_yaml_mapping
from convllava.io.storage import is_s3

__all__ = ["Mixture", "PreprocessConfig", "Source"]


class Source(ConfigModel):
    """One annotation file with its image root, and how much of it the mixture uses."""

    name: str
    annotations: str
    image_root: str
    ratio: float = 1.0
    cap: int | None = None

    @model_validator(mode="after")
    def _check(self) -> Source:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"source name {self.name!r}: use letters, digits, '-', '_' or '.'")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"source {self.name}: ratio must be in (0, 1], got {self.ratio}")
        if self.cap is not None and self.cap < 0:
            raise ValueError(f"source {self.name}: cap must be >= 0, got {self.cap}")
        return self


class Mixture(ConfigModel):
    sources: tuple[Source, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Mixture:
        if not self.sources:
            raise ValueError("a mixture needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> Mixture:
        """A mixture YAML (`sources`, and optionally a `preprocess` section that PreprocessConfig reads); relative
        paths are relative to the YAML's folder."""
        data = load_yaml_mapping(path)
        data.pop("preprocess", None)
        return cls.from_dict(data, str(path)).resolved(Path(path).parent)

    def resolved(self, base: Path | str) -> Mixture:
        """The sources' relative `annotations` and `image_root` made absolute under `base` (a folder or an `s3://`
        prefix); s3:// URIs and absolute paths stay."""
        sources = (
            s.replace(annotations=_resolve(base, s.annotations), image_root=_resolve(base, s.image_root))
            for s in self.sources
        )
        return Mixture(sources=tuple(sources))

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
        sources = (
            Source(name=n, annotations=a, image_root=image_root) for n, a in zip(names, annotations, strict=True)
        )
        return cls(sources=tuple(sources))


def _resolve(base: Path | str, value: str) -> str:
    if is_s3(value) or Path(value).is_absolute():
        return value
    if is_s3(base):
        return posixpath.normpath(f"{str(base).rstrip('/')}/{value}").replace("s3:/", "s3://", 1)
    return str((Path(base) / value).resolve())

"""Reading annotation files into records, resolving image paths safely and fingerprinting content.

Every record read gets a stable key (`source/id`) and a content hash over the preprocessing config, the
record's JSON and its image's fingerprint (size + modification time from the listing, local or S3). Records that
cannot even be parsed still become records — with an error — so that nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import PurePosixPath

from convllava import storage
from convllava.storage import is_s3
from pipelines.config import Source

MAX_RECORD_BYTES = 1_000_000  # one annotation record; anything bigger is hostile or broken


class SourceError(ValueError):
    """An annotation file that cannot be read at all (missing, or a JSON list that does not parse)."""


@dataclass
class Record:
    source: str
    line: int  # 1-based line of a JSONL file, or 1-based position in a JSON list
    id: str
    raw: str  # the record's JSON (or the undecodable line) for quarantine reports
    data: dict | None
    error: tuple[str, str] | None = None  # (category, reason) found while reading
    image: str | None = None  # path relative to the image root
    image_uri: str | None = None  # resolved local path or s3:// URI
    content_hash: str = ""

    @property
    def key(self) -> str:
        return f"{self.source}/{self.id}"


def read_records(source: Source) -> list[Record]:
    """All records of one annotation file. JSON lists and JSONL are told apart by the first character."""
    try:
        data = storage.read_bytes(source.annotations)
    except FileNotFoundError:
        raise SourceError(f"source {source.name}: annotation file {source.annotations} not found") from None
    if data.lstrip()[:1] == b"[":
        try:
            items = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SourceError(f"source {source.name}: {source.annotations} is not a valid JSON list ({e})") from e
        entries = [(i + 1, json.dumps(item, ensure_ascii=False), item, None) for i, item in enumerate(items)]
    else:
        entries = [_parse_line(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    records, seen = [], {}
    for line, raw, item, error in entries:
        rid = str(item.get("id")) if isinstance(item, dict) and item.get("id") not in (None, "") else f"line-{line}"
        if error is None:
            error = _check_record(item, rid, seen, line)
        seen.setdefault(rid, line)
        rec = Record(source.name, line, rid, raw[:2000], item if isinstance(item, dict) else None, error)
        if error is None and isinstance(item.get("image"), str):
            rec.image = item["image"]
            try:
                rec.image_uri = resolve_image(source.image_root, rec.image)
            except ValueError as e:
                rec.error = ("path_escape", str(e))
        if len(raw) > MAX_RECORD_BYTES and rec.error is None:
            rec.error = ("malformed_record", f"record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
        records.append(rec)
    return records


def _parse_line(n: int, line: bytes) -> tuple[int, str, object, tuple[str, str] | None]:
    if len(line) > MAX_RECORD_BYTES:
        return (
            n,
            line[:2000].decode("utf-8", "replace"),
            None,
            ("malformed_record", f"line is {len(line)} bytes, over the {MAX_RECORD_BYTES}-byte limit"),
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return n, line.decode("utf-8", "replace"), None, ("malformed_record", f"invalid UTF-8 ({e.reason})")
    try:
        return n, text, json.loads(text), None
    except json.JSONDecodeError as e:
        return n, text, None, ("malformed_record", f"invalid JSON ({e.msg} at column {e.colno})")


def _check_record(item: object, rid: str, seen: dict[str, int], line: int) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return "malformed_record", f"record is a {type(item).__name__}, not an object"
    if rid in seen:
        return "duplicate_id", f"id {rid!r} already used at line {seen[rid]}"
    if "conversations" not in item:
        return "malformed_record", "missing field 'conversations'"
    image = item.get("image")
    if isinstance(image, list):
        return "unsupported", "multi-image samples (a list in 'image') are not supported"
    if image is not None and (not isinstance(image, str) or not image):
        return "malformed_record", f"field 'image' must be a non-empty string, got {image!r}"
    return None


def resolve_image(root: str, relative: str) -> str:
    """The image's location under its root.

    Raises:
        ValueError: the path is absolute, contains `..` or a backslash, or (local roots) resolves — through
            symlinks — to a place outside the root.
    """
    if "\x00" in relative or "\\" in relative:
        raise ValueError(f"image path {relative!r} contains a NUL or backslash")
    parts = PurePosixPath(relative).parts
    if relative.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
        raise ValueError(f"image path {relative!r} escapes its image root (absolute or '..')")
    if is_s3(root):
        return f"{root.rstrip('/')}/{PurePosixPath(*parts)}"
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *parts))
    if os.path.commonpath([base, target]) != base:
        raise ValueError(f"image path {relative!r} resolves outside its image root (symlink to {target})")
    return target


def image_fingerprints(records: list[Record], root: str) -> dict[str, str]:
    """A cheap content fingerprint per image: S3 size + last-modified time (one listing of the root), or local
    size + mtime."""
    wanted = {r.image_uri for r in records if r.image_uri}
    prints: dict[str, str] = {}
    if is_s3(root):
        base = root.rstrip("/")
        for rel, info in storage.Store(base).listing().items():
            if f"{base}/{rel}" in wanted:
                prints[f"{base}/{rel}"] = f"s3:{info.size}:{info.mtime_ns}"
        return prints
    for uri in wanted:
        try:
            st = os.stat(uri)
            prints[uri] = f"stat:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            prints[uri] = "missing"
    return prints


def assign_content_hashes(records: list[Record], fingerprints: dict[str, str], config_hash: str) -> None:
    for r in records:
        image = fingerprints.get(r.image_uri, "missing") if r.image_uri else "none"
        payload = "\x1f".join([config_hash, r.source, r.id, r.raw, image])
        r.content_hash = hashlib.sha256(payload.encode("utf-8", "replace")).hexdigest()


def select(records: list[Record], source: Source, seed: int) -> list[Record]:
    """The mixture's share of a source: `ratio` of it, at most `cap`, picked by hashed id (deterministic)."""
    k = len(records)
    if source.ratio < 1.0:
        k = math.ceil(source.ratio * k)
    if source.cap is not None:
        k = min(k, source.cap)
    if k >= len(records):
        return records
    order = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{source.name}:{r.id}".encode()).hexdigest())
    chosen = {id(r) for r in order[:k]}
    return [r for r in records if id(r) in chosen]

"""Checking annotation records one at a time: a JSONL line's parse, a record's fields, its image path.

`pipelines.annotations` streams the files and `pipelines.partition` turns each entry into a record row with these;
a record that cannot even be parsed still becomes a record — with an error — so that nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from pathlib import PurePosixPath

from convllava.io.storage import is_s3

MAX_RECORD_BYTES = 1_000_000  # one annotation record; anything bigger is hostile or broken


class SourceError(ValueError):
    """An annotation file that cannot be read at all (missing, or a JSON list that does not parse)."""


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

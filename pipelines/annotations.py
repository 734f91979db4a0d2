"""Streaming reads of LLaVA annotation files — JSONL or one JSON array, local paths or `s3://` URIs.

No function here loads a whole file: memory is one read block (`BLOCK_BYTES`) plus one record, whatever the file's
size. Files are opened through `convllava.io.storage.filesystem`, so on S3 every block is one HTTP range read.

JSONL is read in byte ranges that separate processes read in parallel. `split` cuts [0, size) into ranges; a line
belongs to the range that holds its FIRST byte, so each line is read whole, by exactly one range, even when a cut
falls inside it (a range reads on past its end, a block at a time, to finish its last line). Line numbers are physical and 1-based (blank lines count), as `enumerate(data.split(b"\\n"), 1)`
numbers them: a range's `first_line` is 1 + the `count_lines` of all earlier ranges (a cheap pass that only counts
newlines). Concatenated over the ranges, `iter_jsonl` yields element for element what
`[_parse_line(n, l) for n, l in enumerate(data.split(b"\\n"), start=1) if l.strip()]` gives for the whole file, for
any file and any range size; a line over `MAX_RECORD_BYTES` is never held whole (only its first 2000 bytes and its
length are kept) and gets `_parse_line`'s "over the limit" error.

A JSON array cannot be cut without parsing everything before the cut, so ONE task streams it, with ijson's C backend
(yajl2_c), and yields `(i + 1, json.dumps(item, ensure_ascii=False), item, None)` as `sources.read_records` does.
It agrees with `json.loads` on floats (bit for bit, `use_float=True`), duplicate keys (the last value wins, at the
first key's position), invalid UTF-8 and control characters (errors). It differs on input that strict JSON forbids
or that overflows; each of these raises `SourceError` naming the file and the item reached, where `json.loads`
accepts the file:
  - `NaN`, `Infinity`, `-Infinity`;
  - integers outside the signed 64-bit range (-2**63 itself included), and floats beyond ±1.8e308 (json.loads:
    an exact int, or inf).
And a lone surrogate escape (`"\\ud800"`) becomes "?" (json.loads keeps a lone surrogate, which cannot be encoded
as UTF-8 later).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Literal, NamedTuple

import ijson
import pyarrow.fs as pafs

from convllava.io import storage
from pipelines.sources import MAX_RECORD_BYTES, SourceError, _parse_line

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # one read (one S3 range request); the memory a reader holds besides one record
HEAD_BYTES = 64 << 10  # what `file_kind` reads at a time to find the first non-blank byte
KEPT_BYTES = 2000  # of an over-limit line, as much as `sources._parse_line` keeps for quarantine reports

Entry = tuple[int, str, object, tuple[str, str] | None]  # (line or item number, raw text, parsed item, error)


@contextlib.contextmanager
def _open(uri: str) -> Iterator[tuple[pafs.NativeFile, int]]:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"annotation file {uri} not found")
    if info.type != pafs.FileType.File:
        raise SourceError(f"annotation file {uri} is not a file (it is a {info.type.name.lower()})")
    with fs.open_input_file(path) as f:
        yield f, info.size


def file_size(uri: str) -> int:
    """The annotation file's size in bytes.

    Raises:
        SourceError: there is no such file, or it is a directory.
    """
    with _open(uri) as (_, size):
        return size


def _first_byte(f: pafs.NativeFile) -> bytes:
    """The first byte that is not ASCII whitespace (as `bytes.lstrip` strips), b"" for a blank file."""
    while block := f.read(HEAD_BYTES):
        if head := block.lstrip():
            return head[:1]
    return b""


def file_kind(uri: str) -> Literal["json", "jsonl"]:
    """ "json" when the first non-blank byte is `[`, else "jsonl" (as `sources.read_records` tells them apart).

    Raises:
        SourceError: there is no such file, or it is a directory.
    """
    with _open(uri) as (f, _):
        return "json" if _first_byte(f) == b"[" else "jsonl"


def split(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges [start, stop) of chunk_bytes each (the last one shorter) that cover [0, size); [(0, 0)] for an
    empty file."""
    if chunk_bytes < 1 or size < 0:
        raise ValueError(f"split needs size >= 0 and chunk_bytes >= 1, got size={size}, chunk_bytes={chunk_bytes}")
    return [(start, min(start + chunk_bytes, size)) for start in range(0, size, chunk_bytes)] or [(0, 0)]


def _check_range(start: int, stop: int) -> None:
    if not 0 <= start <= stop:
        raise ValueError(f"a byte range needs 0 <= start <= stop, got [{start}, {stop})")


def count_lines(uri: str, start: int, stop: int, block_bytes: int = BLOCK_BYTES) -> int:
    """How many lines (blank ones included) begin in the byte range [start, stop) of a JSONL file.

    A line begins at offset 0 and right after each newline, so this counts the newlines in [start - 1, stop - 1).
    A line that would begin at the very end of the file (after a final newline) is empty and counted by no range.
    """
    _check_range(start, stop)
    with _open(uri) as (f, size):
        stop = min(stop, size)
        if start >= stop:
            return 0
        count = 1 if start == 0 else 0
        pos, end = max(start - 1, 0), stop - 1
        f.seek(pos)
        while pos < end and (block := f.read(min(block_bytes, end - pos))):
            count += block.count(b"\n")
            pos += len(block)
        return count


class _Oversize(NamedTuple):
    length: int  # bytes, without the newline
    head: bytes  # the first KEPT_BYTES bytes
    blank: bool  # only ASCII whitespace (such a line is skipped, as a short blank line is)


def _first_line_start(f: pafs.NativeFile, start: int, stop: int, block_bytes: int) -> int | None:
    """Offset of the first line that begins in [start, stop) (start > 0): one after the first newline in
    [start - 1, stop - 1); None when there is no such newline."""
    pos, want = start - 1, min(HEAD_BYTES, block_bytes)  # a small first read: lines are short, and it is reread
    f.seek(pos)
    while pos < stop - 1 and (block := f.read(min(want, stop - 1 - pos))):
        if (i := block.find(b"\n")) >= 0:
            return pos + i + 1
        pos, want = pos + len(block), block_bytes
    return None


def _lines(f: pafs.NativeFile, pos: int, stop: int, block_bytes: int) -> Iterator[bytes | _Oversize]:
    """Every line that begins in [pos, stop) (pos being a line start), without its newline; a line over
    MAX_RECORD_BYTES comes as an `_Oversize`, whose bytes past the first KEPT_BYTES are counted and dropped."""
    f.seek(pos)
    parts: list[bytes] = []  # pieces of a line that spans blocks
    length, over, blank = 0, None, True
    while block := f.read(block_bytes):
        i = 0
        while True:
            j = block.find(b"\n", i)
            if j >= 0 and not parts and over is None:  # the common case: the whole line is in this block
                line = block[i:j]
                yield line
                pos += len(line) + 1
            else:
                piece = block[i:] if j < 0 else block[i:j]
                length += len(piece)
                if over is not None:
                    blank = blank and not piece.strip()
                else:
                    parts.append(piece)
                    if length > MAX_RECORD_BYTES:  # keep the head, count the rest
                        over = b"".join(parts)[:KEPT_BYTES]
                        blank = not any(p.strip() for p in parts)
                        parts = []
                if j < 0:
                    break
                yield b"".join(parts) if over is None else _Oversize(length, over, blank)
                pos += length + 1
                parts, length, over, blank = [], 0, None, True
            if pos >= stop:
                return
            i = j + 1
    if length:  # the last line has no newline
        yield b"".join(parts) if over is None else _Oversize(length, over, blank)


def iter_jsonl(uri: str, start: int, stop: int, first_line: int, block_bytes: int = BLOCK_BYTES) -> Iterator[Entry]:
    """`sources._parse_line(n, line)` for each non-blank line that begins in [start, stop), streaming.

    Args:
        first_line: the physical number of the first line that begins in the range: 1 + the `count_lines` of all
            ranges before it.
        block_bytes: bytes per read (one S3 range request each).
    """
    _check_range(start, stop)
    with _open(uri) as (f, size):
        stop = min(stop, size)
        begin = 0 if start == 0 else _first_line_start(f, start, stop, block_bytes)
        if begin is None or begin >= stop:
            return
        for n, line in enumerate(_lines(f, begin, stop, block_bytes), start=first_line):
            if isinstance(line, bytes):
                if line.strip():
                    yield _parse_line(n, line)
            elif not line.blank:
                reason = f"line is {line.length} bytes, over the {MAX_RECORD_BYTES}-byte limit"
                yield n, line.head.decode("utf-8", "replace"), None, ("malformed_record", reason)


def _ijson_reason(e: Exception) -> str:
    """yajl's message on one line: "parse error: ... near '<the text around it>'"."""
    msg = e.args[0] if e.args else str(e)
    if isinstance(msg, bytes):  # yajl2_c reports invalid UTF-8 with a bytes message
        msg = msg.decode("utf-8", "replace")
    lines = [line.strip() for line in str(msg).splitlines() if line.strip() and "(right here)" not in line]
    return f"{lines[0]} near {lines[1]!r}" if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def iter_json_array(uri: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, str, object, None]]:
    """Each item of a JSON array file, in order, as `(i + 1, json.dumps(item, ensure_ascii=False), item, None)`.

    One task streams the whole file; memory is one read block plus one item.

    Raises:
        SourceError: the file is missing, its top level is not an array, or it is not valid JSON (the message names
            the file, how many items were read before the error and the byte offset read up to).
    """
    if ijson.backend != "yajl2_c":
        log.warning("ijson uses its %s backend, not yajl2_c: %s is read many times slower", ijson.backend, uri)
    with _open(uri) as (f, _):
        if (first := _first_byte(f)) != b"[":
            raise SourceError(f"{uri} is not a JSON array: its first non-blank byte is {first!r}, not '['")
        f.seek(0)
        n = 0
        try:
            for n, item in enumerate(ijson.items(f, "item", use_float=True, buf_size=block_bytes), start=1):
                yield n, json.dumps(item, ensure_ascii=False), item, None
        except (ijson.JSONError, UnicodeDecodeError) as e:
            raise SourceError(
                f"{uri} is not a valid JSON array: {_ijson_reason(e)}, after item {n} (read up to byte {f.tell()}); "
                "fix the file or convert it to JSONL"
            ) from None

"""Streaming annotation reads: byte ranges reproduce the whole-file parse exactly, JSON arrays match json.loads,
errors name the file, and memory stays flat on 200 MB files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import ijson
import pytest

from pipelines.annotations import (
    BLOCK_BYTES,
    count_lines,
    file_kind,
    file_size,
    iter_json_array,
    iter_jsonl,
    split,
)
from pipelines.sources import MAX_RECORD_BYTES, SourceError, _parse_line

REPO = Path(__file__).resolve().parents[2]


def reference_jsonl(data: bytes) -> list:
    """What `sources.read_records` parses from a whole JSONL file."""
    return [_parse_line(n, line) for n, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


def reference_json(data: bytes) -> list:
    return [(i + 1, json.dumps(item, ensure_ascii=False), item, None) for i, item in enumerate(json.loads(data))]


def read_in_ranges(uri: str, chunk_bytes: int, block_bytes: int = BLOCK_BYTES) -> tuple[list, int]:
    """(entries of every range concatenated, lines counted over all ranges), as parallel readers would do it."""
    entries, first = [], 1
    for start, stop in split(file_size(uri), chunk_bytes):
        entries += iter_jsonl(uri, start, stop, first, block_bytes)
        first += count_lines(uri, start, stop, block_bytes)
    return entries, first - 1


def lines_before_end(data: bytes) -> int:
    """Physical lines that begin before the end of the file (a final newline starts no counted line)."""
    return data.count(b"\n") + (0 if not data or data.endswith(b"\n") else 1)


RANDOM_LINES = [
    lambda r: json.dumps({"id": r.randrange(10**6), "conversations": [{"from": "human", "value": "<image>\nHi"}]}),
    lambda r: json.dumps({"id": "é東京🙂", "x": r.random(), "s": "tab\tnl\n"}, ensure_ascii=r.random() < 0.5),
    lambda r: b'{"id": "bad \xff\xfe utf8"}',
    lambda r: "é".encode()[:1] + b"{}",  # a cut multi-byte character
    lambda r: r.choice(['{"id": 1,', "[1, 2", "nope", "{}}", '{"a":1}\r{"b":2}', "\u00a0{}"]),  # invalid JSON
    lambda r: r.choice(["[1, 2]", "42", "7", '"s"', "null", "{}"]),  # JSON, but not an object
    lambda r: r.choice(["", "", " ", "\t \x0b\x0c", "\r"]),  # blank
]


def random_file(r: random.Random) -> bytes:
    lines = []
    for _ in range(r.randrange(0, 25)):
        line = r.choice(RANDOM_LINES)(r)
        line = line.encode() if isinstance(line, str) else line
        lines.append(line + b"\r" if r.random() < 0.3 else line)
    return b"\n".join(lines) + r.choice([b"", b"\n", b"\r\n", b"\n\n"])


EDGE_FILES = [
    b"",
    b"\n",
    b"\n\n",
    b"\r\n",
    b" ",
    b"{}",
    b"{}\n",
    b"\n{}",
    b"{}\n\n{}",
    b'{"a":\n1}',
    b"x" * 50,
    b"{}\n7",
    b"x",
]


def test_ranges_reproduce_whole_file_parse(tmp_path):
    r = random.Random(1234)
    files = EDGE_FILES + [random_file(r) for _ in range(120)]
    for k, data in enumerate(files):
        path = tmp_path / f"f{k}.jsonl"
        path.write_bytes(data)
        expected = reference_jsonl(data)
        size = len(data)
        for chunk in sorted({1, 2, 7, 64, max(size, 1), size + 5}):
            block = r.choice([1, 2, 5, 16, 64, BLOCK_BYTES])  # small blocks: lines that span reads
            got, counted = read_in_ranges(str(path), chunk, block)
            assert got == expected, (data, chunk, block)
            assert counted == lines_before_end(data), (data, chunk, block)


def test_split_covers_the_file():
    assert split(0, 5) == [(0, 0)]
    assert split(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert split(10, 10) == split(10, 64) == [(0, 10)]
    with pytest.raises(ValueError, match="chunk_bytes"):
        split(10, 0)


def test_over_limit_line_gives_parse_line_error(tmp_path):
    big = json.dumps({"id": "big", "pad": "x" * (MAX_RECORD_BYTES + 10)}).encode()
    cut = b"a" * 1999 + "é".encode() + b"z" * MAX_RECORD_BYTES  # the kept 2000 bytes end inside a character
    blank = b" " * (MAX_RECORD_BYTES + 5)  # blank, so skipped, however long
    late = b" " * (MAX_RECORD_BYTES + 200_000) + b"{}"  # not blank, though its first MAX_RECORD_BYTES are
    data = b"\n".join([b'{"id": 1}', big, blank, b'{"id": 2}\r', late, cut])  # `cut` is last, with no newline
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    expected = reference_jsonl(data)
    assert [e[0] for e in expected] == [1, 2, 4, 5, 6]
    assert expected[1][3] == ("malformed_record", f"line is {len(big)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    assert expected[3][1] == " " * 2000 and expected[3][3][1].startswith(f"line is {len(late)} bytes")
    assert expected[4][1].endswith("a\ufffd") and len(expected[4][1]) == 2000
    for chunk, block in [(len(data), BLOCK_BYTES), (len(data), 64 << 10), (300_000, 4096), (250_000, 1 << 20)]:
        assert read_in_ranges(str(path), chunk, block)[0] == expected, (chunk, block)


def test_json_array_matches_json_loads(tmp_path):
    items = [
        {"id": "é東京🙂", "conversations": [{"from": "human", "value": '<image>\nWhat?\t"q"'}], "n": None},
        {"id": 7, "floats": [0.1, 1e-300, 1.7976931348623157e308, -0.0, 5e-324, 123.456e5, 2.0], "ok": True},
        {"b": 1, "a": [], "nested": {"deep": [[{}]]}, "big": 2**63 - 1, "neg": -(2**62)},
        [1, "list item"],
        "a string item",
    ]
    text = "  \n[" + ",\n".join(json.dumps(i, ensure_ascii=k % 2 == 0) for k, i in enumerate(items)) + "]\n"
    text = text.replace('"b": 1,', '"b": 1, "a": "first", "b": 3,')  # a duplicate key: the last value wins
    data = text.encode()
    path = tmp_path / "a.json"
    path.write_bytes(data)
    assert file_kind(str(path)) == "json"
    expected = reference_json(data)
    assert expected[2][2] == {"b": 3, "a": [], "nested": {"deep": [[{}]]}, "big": 2**63 - 1, "neg": -(2**62)}
    for block in (BLOCK_BYTES, 7):  # 7: items split across ijson's reads
        got = list(iter_json_array(str(path), block))
        assert got == expected
        assert [json.dumps(e[2]) for e in got] == [json.dumps(e[2]) for e in expected]  # floats bit for bit


def test_json_backend_is_yajl2_c():
    assert ijson.backend == "yajl2_c"  # the pure-Python fallback is tens of times slower


def test_file_kind(tmp_path):
    for name, data, kind in [
        ("a", b" \r\n\t[1]", "json"),
        ("b", b'{"id": 1}\n', "jsonl"),
        ("c", b"", "jsonl"),
        ("d", b" " * 100_000 + b"[", "json"),  # the first byte lies beyond the first head read
        ("e", b"\xef\xbb\xbf[]", "jsonl"),  # a BOM is not whitespace, as in sources.read_records
    ]:
        (tmp_path / name).write_bytes(data)
        assert file_kind(str(tmp_path / name)) == kind, name


def test_missing_file_is_named(tmp_path):
    uri = str(tmp_path / "nope.jsonl")
    for call in (
        lambda: file_size(uri),
        lambda: file_kind(uri),
        lambda: count_lines(uri, 0, 10),
        lambda: list(iter_jsonl(uri, 0, 10, 1)),
        lambda: list(iter_json_array(uri)),
    ):
        with pytest.raises(SourceError, match=f"annotation file {uri} not found"):
            call()
    with pytest.raises(SourceError, match="is not a file"):
        file_size(str(tmp_path))


@pytest.mark.parametrize(
    "data, items_before, reason",
    [
        (b'[{"id": 1}, {"id": 2}, {"id": 3,, }]', 2, "parse error"),
        (b'[{"id": 1}, {"id": "\xff"}]', 1, "invalid bytes in UTF8"),
        (b'[{"id": 1}, {"id": 2}', 2, "premature EOF"),
        (b'[{"id": 1}] trailing', 1, "trailing garbage"),
        (b'[{"id": 1}, NaN]', 1, "invalid char"),  # json.loads accepts NaN; strict JSON does not
        (b'[{"id": 1}, 9223372036854775808]', 1, "integer overflow"),  # json.loads gives the exact int
        (b'[{"id": 1}, 1e400]', 1, "overflow"),  # json.loads gives inf
    ],
)
def test_json_array_errors_name_file_and_item(tmp_path, data, items_before, reason):
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    seen = []
    with pytest.raises(SourceError) as info:
        seen.extend(iter_json_array(str(path)))
    message = str(info.value)
    assert str(path) in message and f"after item {items_before}" in message and reason in message, message
    assert "\n" not in message
    assert [e[0] for e in seen] == list(range(1, items_before + 1))  # the items before the error were streamed


def test_json_array_top_level_must_be_array(tmp_path):
    path = tmp_path / "obj.json"
    path.write_bytes(b'{"item": [1, 2]}')  # ijson's "item" prefix would match this object's key
    with pytest.raises(SourceError, match=f"{path} is not a JSON array: its first non-blank byte is b'{{'"):
        list(iter_json_array(str(path)))


def test_lone_surrogate_becomes_question_mark(tmp_path):
    """A documented difference from json.loads (which keeps '\\ud800', not encodable as UTF-8)."""
    path = tmp_path / "s.json"
    path.write_bytes(b'["\\ud800", "\\ud83d\\ude00"]')
    assert [e[2] for e in iter_json_array(str(path))] == ["?", "\U0001f600"]


# 400k LLaVA-like records of ~500 bytes: ~200 MB as JSONL and as a JSON array.
RECORDS = 400_000


def _record(i: int) -> dict:
    return {
        "id": f"{i:012d}",
        "image": f"coco/train2017/{i:012d}.jpg",
        "conversations": [
            {"from": "human", "value": f"<image>\nWhat is shown in picture {i}? Describe the scene — señal, 東京."},
            {"from": "gpt", "value": f"Picture {i} shows " + "a street with cars, bikes and people walking; " * 7},
        ],
    }


def _write_big_files(jsonl: Path, array: Path) -> None:
    """Written batch by batch, so that this process never holds a file either."""
    with open(jsonl, "w", encoding="utf-8") as fl, open(array, "w", encoding="utf-8") as fa:
        fa.write("[\n")
        for lo in range(0, RECORDS, 20_000):
            batch = [json.dumps(_record(i), ensure_ascii=False) for i in range(lo, lo + 20_000)]
            fl.write("\n".join(batch) + "\n")
            fa.write((",\n" if lo else "") + ",\n".join(batch))
        fa.write("\n]\n")


MEASURE = textwrap.dedent(
    r"""
    import json, re, sys, time
    from pipelines.annotations import file_size, iter_json_array, iter_jsonl

    def peak():  # this process's peak RSS in bytes. Not getrusage's ru_maxrss: a child starts with its parent's
        # peak there (Linux carries the pre-exec peak over), which under pytest hides everything below ~900 MB.
        return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    jsonl, array = sys.argv[1], sys.argv[2]
    out = {"baseline": peak()}
    t = time.perf_counter()
    out["jsonl_count"] = sum(1 for _ in iter_jsonl(jsonl, 0, file_size(jsonl), 1))
    out["jsonl_s"], out["jsonl_peak"] = time.perf_counter() - t, peak()
    t = time.perf_counter()
    out["json_count"] = sum(1 for _ in iter_json_array(array))
    out["json_s"], out["json_peak"] = time.perf_counter() - t, peak()
    print(json.dumps(out))
    """
)


def test_memory_stays_flat_on_200mb_files(tmp_path):
    jsonl, array = tmp_path / "big.jsonl", tmp_path / "big.json"
    _write_big_files(jsonl, array)
    size = array.stat().st_size
    assert size > 190e6
    # A fresh process: its peak RSS after importing the module is the baseline (torch and transformers come in
    # with pipelines.sources, ~800 MB); reading must add at most 64 MiB, a block or two and one record. By hand,
    # json.loads of this 228 MB array peaks 1051 MiB over its baseline (bytes + decoded str + objects, ~4.8x the
    # file), and a reader that kept every record (list(iter_jsonl(...))) 1262 MiB.
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(jsonl), str(array)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"jsonl: {RECORDS / out['jsonl_s']:,.0f} records/s, {jsonl.stat().st_size / out['jsonl_s'] / 1e6:.0f} MB/s; "
        f"json array: {RECORDS / out['json_s']:,.0f} records/s, {size / out['json_s'] / 1e6:.0f} MB/s; "
        f"peak over baseline: jsonl {(out['jsonl_peak'] - out['baseline']) / 2**20:.1f} MiB, "
        f"both {(out['json_peak'] - out['baseline']) / 2**20:.1f} MiB"
    )
    assert out["jsonl_count"] == out["json_count"] == RECORDS
    assert out["jsonl_peak"] - out["baseline"] <= 64 << 20
    assert out["json_peak"] - out["baseline"] <= 64 << 20
    jsonl.unlink()
    array.unlink()

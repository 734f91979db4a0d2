"""Raw annotation sets on disk for the preprocessing tests (records, images, JSON lines) and a one-call
preprocessing run that returns its manifest and reads back its shard rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from pipelines.config import Mixture, PreprocessConfig, Source
from pipelines.preprocess import run_preprocess

ASK = "<image>\nWhat is in the image?"


def conv(question: str = ASK, answer: str = "A red square.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def rec(rid: str, image: str | None, conversations=None) -> dict:
    r = {"id": rid, "conversations": conversations or conv()}
    if image is not None:
        r["image"] = image
    return r


def save(root: Path, name: str, image: Image.Image, **kw) -> str:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)
    return name


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSON lines; a str or bytes record is written as it is (hostile raw lines)."""

    def raw(r) -> bytes:
        return r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()

    path.write_bytes(b"".join(raw(r) + b"\n" for r in records))
    return path


def good_set(root: Path, n: int = 6) -> list[dict]:
    """Clean samples at several aspect ratios plus one text-only."""
    sizes = [(320, 160), (160, 320), (256, 256), (400, 100), (300, 225), (225, 300)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        colour = (30 * i % 255, 200, 40)
        out.append(rec(f"good{i}", save(root, f"img/good{i}.jpg", Image.new("RGB", (w, h), colour))))
    out.append(rec("text0", None, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]))
    return out


def run(root: Path, records: list, out: Path, **cfg) -> dict:
    write_jsonl(root / "data.jsonl", records)
    mixture = Mixture(sources=(Source(name="data", annotations=str(root / "data.jsonl"), image_root=str(root)),))
    config = PreprocessConfig(resolution=256, max_length=256, **cfg)
    run_preprocess(mixture, config, str(out), echo=lambda *_: None)
    return json.loads((out / "manifest.json").read_text())


def rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("shards/*/*.parquet")) for r in pq.read_table(p).to_pylist()]

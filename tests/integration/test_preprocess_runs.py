"""Preprocessing runs: deterministic output, incremental re-runs, mixture ratios and caps, and an S3 round trip."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from preprocess_harness import ASK, conv, good_set, rec, rows, run, save, write_jsonl

from convllava.data.shards import read_index
from convllava.io.storage import Store
from pipelines.config import Mixture, PreprocessConfig, Source
from pipelines.preprocess import run_preprocess

pytestmark = pytest.mark.integration


def _tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("shards/*/*.parquet")}


def _rows_by_id(out: Path) -> dict[str, tuple]:
    return {r["id"]: (r["bucket"], r["image"], tuple(r["input_ids"]), tuple(r["labels"])) for r in rows(out)}


def test_deterministic_and_incremental(ray_local, tmp_path):
    root = tmp_path / "data"
    records = good_set(root)
    run(root, records, tmp_path / "one")
    run(root, records, tmp_path / "two", workers=1, threads=2)  # one actor, two samples at once
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")  # byte-identical files under identical names
    run(root, records, tmp_path / "three", unit_size=2)  # smaller work units: their parts merge into the same files
    assert _tree(tmp_path / "three") == _tree(tmp_path / "one")
    run(root, records, tmp_path / "four", unit_size=2, shard_rows=1)  # other files (one row each), the same rows
    assert len(_tree(tmp_path / "four")) == 7 > len(_tree(tmp_path / "one"))
    assert _rows_by_id(tmp_path / "four") == _rows_by_id(tmp_path / "one")

    before = _tree(tmp_path / "one")
    mtimes = {p: (tmp_path / "one" / p).stat().st_mtime_ns for p in before}
    again = run(root, records, tmp_path / "one")
    assert again["run"] == {**again["run"], "processed": 0, "reused": 7, "removed": 0}
    assert _tree(tmp_path / "one") == before

    new = rec("new0", save(root, "img/new0.jpg", Image.new("RGB", (512, 128), (1, 2, 250))))
    changed = dict(records[1], conversations=conv(ASK, "A green square."))
    updated = [records[0], changed, *records[3:], new]  # records[2] removed
    manifest = run(root, updated, tmp_path / "one")
    assert manifest["run"]["processed"] == 2 and manifest["run"]["reused"] == 5 and manifest["run"]["removed"] == 2
    assert manifest["read"] == manifest["written"] == 7
    after = _tree(tmp_path / "one")
    untouched = [p for p in before if p in after]
    assert untouched and all((tmp_path / "one" / p).stat().st_mtime_ns == mtimes[p] for p in untouched)
    ids = [r["id"] for r in rows(tmp_path / "one")]
    assert sorted(ids) == sorted(r["id"] for r in updated)  # no stale or duplicate rows
    answer = next(r for r in rows(tmp_path / "one") if r["id"] == changed["id"])
    assert 5 < len(answer["labels"]) and answer["content_hash"] != "" and len(ids) == len(set(ids))
    lines = {e["id"]: e["line"] for e in read_index(Store(str(tmp_path / "one"))).values()}
    assert lines == {r["id"]: i for i, r in enumerate(updated, 1)}  # reused entries moved with their records

    # A shard file that went missing: its samples are redone into the same file, which stays. (The file of a sample
    # written with its current annotation line: a row records the line its sample had when it was processed.)
    lost = next(p for p in after if new["id"] in pq.read_table(tmp_path / "one" / p).column("id").to_pylist())
    (tmp_path / "one" / lost).unlink()
    redone = run(root, updated, tmp_path / "one")
    assert redone["run"]["processed"] == pq.read_metadata(tmp_path / "one" / lost).num_rows
    assert _tree(tmp_path / "one") == after


def test_in_process_writes_what_ray_writes(ray_local, tmp_path):
    """`in_process` (the quickstart's few samples) runs the same stages in this process: the same shard files under
    the same names, the same index entries and counts, after a first run (units whose parts merge) and after a rerun
    that drops a removed sample's row from its shard."""
    root = tmp_path / "data"
    records = good_set(root)
    config = PreprocessConfig(resolution=256, max_length=256, unit_size=2)

    def both(records: list[dict]) -> dict[bool, dict]:
        write_jsonl(root / "data.jsonl", records)
        mixture = Mixture(sources=(Source(name="data", annotations=str(root / "data.jsonl"), image_root=str(root)),))
        for in_process in (False, True):
            out = str(tmp_path / ("local" if in_process else "ray"))
            run_preprocess(mixture, config, out, echo=lambda *_: None, in_process=in_process)
        assert _tree(tmp_path / "local") == _tree(tmp_path / "ray")
        assert read_index(Store(str(tmp_path / "local"))) == read_index(Store(str(tmp_path / "ray")))
        return {
            p: json.loads((tmp_path / n / "manifest.json").read_text()) for p, n in ((True, "local"), (False, "ray"))
        }

    first = both(records)
    assert first[True]["run"]["processed"] == first[False]["run"]["processed"] == 7 and len(first[True]["shards"]) > 0
    second = both(records[:-1])
    for key in ("read", "written", "quarantined", "buckets", "shards", "input_fingerprint", "config_hash"):
        assert second[True][key] == second[False][key], key
    assert second[True]["run"] == {**second[False]["run"], "seconds": second[True]["run"]["seconds"]}
    assert second[True]["run"]["removed"] == 1 and second[True]["run"]["reused"] == 6


def test_mixture_yaml_ratios_and_caps(ray_local, tmp_path):
    root = tmp_path / "data"
    records = good_set(root, n=6)
    write_jsonl(root / "a.jsonl", records)
    (root / "b.json").write_text(json.dumps([dict(r, id=f"b{i}") for i, r in enumerate(records)]))
    (root / "mix.yaml").write_text(
        "sources:\n  - {name: a, annotations: a.jsonl, image_root: ., ratio: 0.5}\n"
        "  - {name: b, annotations: b.json, image_root: ., cap: 2}\npreprocess: {resolution: 256}\n"
    )
    mixture = Mixture.from_yaml(root / "mix.yaml")
    run_preprocess(mixture, PreprocessConfig.from_yaml(root / "mix.yaml"), str(tmp_path / "out"), echo=lambda *_: None)
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["sources"]["a"] == {"available": 7, "read": 4, "written": 4, "quarantined": 0}
    assert manifest["sources"]["b"]["available"] == 7 and manifest["sources"]["b"]["read"] == 2
    assert manifest["read"] == 6


def test_s3_round_trip(ray_local, s3_bucket, tmp_path):
    from convllava.io.storage import upload_dir

    root = tmp_path / "data"
    records = good_set(root)
    write_jsonl(root / "data.jsonl", records)
    upload_dir(root, f"s3://{s3_bucket}/raw")
    mixture = Mixture(
        sources=(
            Source(name="data", annotations=f"s3://{s3_bucket}/raw/data.jsonl", image_root=f"s3://{s3_bucket}/raw"),
        )
    )
    config = PreprocessConfig(resolution=256, max_length=256, unit_size=2)  # units' parts merge on S3
    run_preprocess(mixture, config, f"s3://{s3_bucket}/shards", echo=lambda *_: None)
    local = run(root, records, tmp_path / "local")

    import boto3

    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="shards/manifest.json")["Body"].read())
    assert (manifest["read"], manifest["written"]) == (7, 7) and manifest["buckets"] == local["buckets"]
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="shards/shards/")["Contents"]
    # Deleting the merged parts leaves pyarrow's empty "bucket=HxW/" directory markers; objects are the rest.
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))
    assert len(keys) == len(_tree(tmp_path / "local")) == len(manifest["shards"])
    remote = {}
    for key in keys:  # same rows as the local run (content hashes differ: S3 fingerprints are listing sizes + times)
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()))
        remote.update(
            {r["id"]: (r["bucket"], r["image"], tuple(r["input_ids"]), tuple(r["labels"])) for r in table.to_pylist()}
        )
    assert remote == _rows_by_id(tmp_path / "local")

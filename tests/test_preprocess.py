"""The Ray Data preprocessing pipeline end to end on a local Ray instance: shards, bad input, reconciliation,
determinism, incremental re-runs, mixtures, S3 and the CLI contract."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from convllava.data import collate
from convllava.image_processing import ConvLlavaImageProcessor, load_image
from pipelines.config import ConfigError, Mixture, PreprocessConfig, Source
from pipelines.preprocess import QuarantineLimitExceeded, run_preprocess
from pipelines.store import OutputError

pytestmark = pytest.mark.integration

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


def hostile_set(root: Path, outside: Path) -> tuple[list, dict[str, str]]:
    """One record per bad-input case; returns the records and {id: expected quarantine category}."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "img/empty.jpg").write_bytes(b"")
    (root / "img/notes.png").write_text("this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (9, 9, 9)).save(buf, format="JPEG")
    (root / "img/cut.jpg").write_bytes(buf.getvalue()[:200])
    save(root, "img/bomb.png", Image.new("L", (3000, 3000)))
    save(root, "img/tiny.png", Image.new("RGB", (16, 16)))
    save(outside, "secret.png", Image.new("RGB", (64, 64)))
    os.symlink(outside / "secret.png", root / "img/link.png")
    records = [
        rec("missing", "img/nope.jpg"),
        rec("empty", "img/empty.jpg"),
        rec("notimage", "img/notes.png"),
        rec("truncated", "img/cut.jpg"),
        rec("bomb", "img/bomb.png"),
        rec("toosmall", "img/tiny.png"),
        rec("dotdot", "../outside/secret.png"),
        rec("absolute", str(outside / "secret.png")),
        rec("symlink", "img/link.png"),
        {"id": "noconv", "image": "img/good0.jpg"},
        rec("alternate", "img/good0.jpg", [{"from": "human", "value": ASK}, {"from": "human", "value": "Again?"}]),
        rec("notag", "img/good0.jpg", conv("What is in the image?")),
        rec("twotags", "img/good0.jpg", conv("<image> and <image>?")),
        rec("emptyturn", "img/good0.jpg", [{"from": "human", "value": ASK}, {"from": "gpt", "value": "  "}]),
        rec("toolong", "img/good0.jpg", conv(ASK, "word " * 400)),
        rec("masked", "img/good0.jpg", conv(ASK + " Describe it." * 60, "Red.")),
        rec("multi", ["img/good0.jpg", "img/good1.jpg"]),
        rec("good0", "img/good1.jpg"),  # duplicate id
        "{this is not json",
        b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',  # invalid UTF-8
        '{"id": "huge", "conversations": [], "pad": "' + "x" * 1_100_000 + '"}',
    ]
    expected = {
        "missing": "missing_file", "empty": "empty_file", "notimage": "unreadable_image",
        "truncated": "unreadable_image", "bomb": "decompression_bomb", "toosmall": "too_small",
        "dotdot": "path_escape", "absolute": "path_escape", "symlink": "path_escape", "noconv": "malformed_record",
        "alternate": "malformed_record", "notag": "malformed_record", "twotags": "malformed_record",
        "emptyturn": "malformed_record", "masked": "preflight", "multi": "unsupported",
        "good0": "duplicate_id", "line-": "malformed_record",
    }  # fmt: skip
    return records, expected


def odd_modes_set(root: Path) -> list[dict]:
    """Images that must be handled, not quarantined: CMYK, 16-bit, palette + transparency, grey, animated, EXIF."""
    pal = Image.new("P", (128, 96), 1)
    pal.putpalette([0, 0, 0] + [200, 30, 30] * 255)
    pal.info["transparency"] = 0
    frames = [Image.new("RGB", (96, 128), c) for c in [(255, 0, 0), (0, 0, 255)]]
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray((np.arange(128 * 128, dtype=np.uint16) * 3).reshape(128, 128))
    names = {
        "cmyk": save(root, "img/cmyk.jpg", Image.new("CMYK", (160, 120), (0, 200, 200, 0))),
        "sixteen": save(root, "img/sixteen.png", sixteen),
        "palette": save(root, "img/palette.png", pal, transparency=0),
        "grey": save(root, "img/grey.png", Image.new("L", (120, 160), 100)),
        "animated": save(root, "img/anim.gif", frames[0], save_all=True, append_images=frames[1:]),
        "exif": save(root, "img/exif.jpg", Image.new("RGB", (400, 100), (0, 99, 0)), exif=exif),
    }
    return [rec(k, v) for k, v in names.items()]


def run(root: Path, records: list, out: Path, **cfg) -> dict:
    write_jsonl(root / "data.jsonl", records)
    mixture = Mixture((Source("data", str(root / "data.jsonl"), str(root)),))
    config = PreprocessConfig(resolution=256, max_length=256, **cfg)
    run_preprocess(mixture, config, str(out), echo=lambda *_: None)
    return json.loads((out / "manifest.json").read_text())


def rows(out: Path) -> list[dict]:
    return [r for p in sorted(out.glob("shards/*/*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_shards_hold_everything_training_needs(ray_local, tmp_path, tiny_processor):
    root = tmp_path / "data"
    manifest = run(root, good_set(root), tmp_path / "out")
    assert (manifest["read"], manifest["written"], manifest["quarantined"]) == (7, 7, 0)
    assert manifest["buckets"] == {"128x512": 1, "192x320": 2, "256x256": 1, "320x192": 2, "text": 1}
    assert sum(manifest["buckets"].values()) == sum(s["rows"] for s in manifest["shards"]) == 7
    assert manifest["padded_pixel_fraction"] < 0.15  # a 16-token budget has coarse buckets; bench/ measures 768+
    assert sum(manifest["token_length_histogram"]["counts"]) == 7
    assert (tmp_path / "out/buckets.png").read_bytes()[:4] == b"\x89PNG"
    for row in rows(tmp_path / "out"):
        assert len(row["input_ids"]) == len(row["labels"]) == row["length"]
        assert row["input_ids"].count(tiny_processor.image_token_id) == row["num_image_tokens"]
        if row["bucket"] == "text":
            assert row["image"] is None and row["num_image_tokens"] == 0
            continue
        image = Image.open(io.BytesIO(row["image"]))
        assert f"{image.height}x{image.width}" == row["bucket"]
        assert row["num_image_tokens"] == (image.height // 64) * (image.width // 64)
        learned = tiny_processor.tokenizer.decode([t for t in row["labels"] if t != -100])
        assert learned == " A red square.</s>"


def llava_pad_reference(image: Image.Image, resolution: int) -> torch.Tensor:
    """The released models' pixels: LLaVA's expand2square (fill int(mean·255), floored centring), then the PIL
    CLIP processor (see tests/test_image_processing.py, which checks `square` mode against it in memory)."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}
    )
    (w, h), side = image.size, max(image.size)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in processor.image_mean))
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return torch.from_numpy(np.asarray(processor.preprocess(square)["pixel_values"][0]))


def test_square_png_shards_carry_the_released_models_pixels(ray_local, tmp_path, photos):
    root = tmp_path / "data"
    chosen = {p.name: p.path for p in photos if p.name in ("coffee", "chelsea", "rocket")}  # 600x400, 451x300, 640x427
    (root / "img").mkdir(parents=True)
    records = [
        rec(name, Path(shutil.copy(path, root / "img")).relative_to(root).as_posix()) for name, path in chosen.items()
    ]
    tall = load_image(chosen["chelsea"]).crop((40, 0, 373, 300)).resize((333, 517))  # odd sides, 1:1.55
    records.append(rec("tall", save(root, "img/tall.png", tall)))
    manifest = run(root, records, tmp_path / "out", mode="square", image_format="png")
    assert manifest["written"] == 4 and manifest["buckets"] == {"256x256": 4}
    shard_rows = sorted(rows(tmp_path / "out"), key=lambda r: r["id"])
    pixels = collate(shard_rows, pad_token_id=0)["pixel_values"]  # what training reads: (4, 3, 256, 256)
    proc = ConvLlavaImageProcessor(resolution=256, mode="square")
    for row, x in zip(shard_rows, pixels, strict=True):
        original = load_image(root / next(r["image"] for r in records if r["id"] == row["id"]))
        diff = (x - llava_pad_reference(original, 256)).abs().max().item()
        assert diff <= 1 / 255, f"{row['id']}: max |shard - reference| = {diff:.4f} (normalised)"
        p = proc.target(*original.size)  # content_box: where the content lies in the 256x256 frame
        assert row["content_box"] == [p.offset_x, p.offset_y, p.content_width, p.content_height]
        assert (row["orig_width"], row["orig_height"]) == original.size


def test_every_bad_input_is_quarantined_with_its_reason_and_counts_reconcile(ray_local, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    good = good_set(root)
    bad, expected = hostile_set(root, outside)
    odd = odd_modes_set(root)
    # truncate policy: "toolong" is cut and kept, "masked" loses every reply to the cut → preflight.
    config = dict(max_pixels=1_000_000, too_long="truncate", max_quarantine_fraction=1.0)
    manifest = run(root, good + bad + odd, tmp_path / "out", **config)
    quarantine = [json.loads(line) for line in (tmp_path / "out/quarantine.jsonl").read_text().splitlines()]
    by_id = {q["id"]: q for q in quarantine}
    for rid, category in expected.items():
        match = [q for q in quarantine if q["id"] == rid or (rid == "line-" and q["id"].startswith("line-"))]
        assert match and all(q["category"] == category for q in match), (rid, match)
    huge = [q for q in quarantine if "byte limit" in q["reason"]]
    assert len(huge) == 1 and huge[0]["category"] == "malformed_record" and huge[0]["line"] == len(good) + len(bad)
    utf8 = [q for q in quarantine if "invalid UTF-8" in q["reason"]]
    assert len(utf8) == 1 and utf8[0]["line"] == len(good) + len(bad) - 1 and "caf" in utf8[0]["record"]
    assert "img/nope.jpg not found" in by_id["missing"]["reason"]
    assert "duplicate" not in by_id["missing"]["reason"] and "line 1" in by_id["good0"]["reason"]
    assert all(q["line"] >= 1 and q["record"] and q["reason"] for q in quarantine)
    assert manifest["read"] == len(good) + len(bad) + len(odd)
    assert manifest["written"] + manifest["quarantined"] == manifest["read"] and manifest["reconciled"]
    assert manifest["quarantined"] == len(quarantine) == len(bad) - 1  # "toolong" is truncated, not quarantined
    written = {r["id"]: r for r in rows(tmp_path / "out")}
    assert set(written) == {r["id"] for r in good + odd} | {"toolong"} and written["toolong"]["truncated"]
    assert written["exif"]["orig_width"] == 100 and written["exif"]["orig_height"] == 400  # rotated on load
    for rid in ("cmyk", "sixteen", "palette", "grey", "animated"):
        assert Image.open(io.BytesIO(written[rid]["image"])).mode == "RGB"


def test_truncate_policy_keeps_long_samples_and_limit_fails_the_job(ray_local, tmp_path):
    root = tmp_path / "data"
    records = good_set(root) + [rec("long", "img/good0.jpg", conv(ASK, "word " * 400))]
    manifest = run(root, records, tmp_path / "a", too_long="truncate")
    long_row = next(r for r in rows(tmp_path / "a") if r["id"] == "long")
    assert long_row["truncated"] and long_row["length"] == 256 and manifest["quarantined"] == 0
    strict = run(root, records, tmp_path / "q", too_long="quarantine", max_quarantine_fraction=0.5)
    assert strict["quarantine_reasons"] == {"too_long": 1} and strict["written"] == 7
    bad = records + [rec(f"gone{i}", f"img/missing{i}.jpg") for i in range(3)]
    with pytest.raises(QuarantineLimitExceeded, match=r"3 of 11 samples quarantined \(27.3%\), over the limit 10.0%"):
        run(root, bad, tmp_path / "b")
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())  # everything was still written
    assert (manifest["written"], manifest["quarantined"]) == (8, 3)


def _tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.parquet")}


def _rows_by_id(out: Path) -> dict[str, tuple]:
    return {r["id"]: (r["bucket"], r["image"], tuple(r["input_ids"]), tuple(r["labels"])) for r in rows(out)}


def test_deterministic_and_incremental(ray_local, tmp_path):
    root = tmp_path / "data"
    records = good_set(root)
    run(root, records, tmp_path / "one")
    run(root, records, tmp_path / "two")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")  # byte-identical files under identical names
    run(root, records, tmp_path / "three", unit_size=2)  # other work units: other files, the same rows
    assert _rows_by_id(tmp_path / "three") == _rows_by_id(tmp_path / "one")

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


def test_config_errors_name_the_key_and_unwritable_output_fails_first(tmp_path):
    (tmp_path / "c.yaml").write_text("resolution: 256\nresolutoin: 512\n")
    with pytest.raises(ConfigError, match=r"unknown preprocess key\(s\) \['resolutoin'\]"):
        PreprocessConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="resolution"):
        PreprocessConfig(resolution=300)
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: a, annotations: a.jsonl, image_root: ., weight: 2}\n")
    with pytest.raises(ConfigError, match=r"sources\[0\]: unknown key\(s\) \['weight'\]"):
        Mixture.from_yaml(tmp_path / "m.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    mixture = Mixture((Source("a", str(tmp_path / "a.jsonl"), str(tmp_path)),))
    with pytest.raises(OutputError, match="not writable.*nothing was processed"):
        run_preprocess(mixture, PreprocessConfig(resolution=256), str(blocker / "out"), echo=lambda *_: None)


def test_s3_round_trip(ray_local, s3_bucket, tmp_path):
    from convllava.storage import upload_dir

    root = tmp_path / "data"
    records = good_set(root)
    write_jsonl(root / "data.jsonl", records)
    upload_dir(root, f"s3://{s3_bucket}/raw")
    mixture = Mixture((Source("data", f"s3://{s3_bucket}/raw/data.jsonl", f"s3://{s3_bucket}/raw"),))
    config = PreprocessConfig(resolution=256, max_length=256)
    run_preprocess(mixture, config, f"s3://{s3_bucket}/shards", echo=lambda *_: None)
    local = run(root, records, tmp_path / "local")

    import boto3

    s3 = boto3.client("s3")
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key="shards/manifest.json")["Body"].read())
    assert (manifest["read"], manifest["written"]) == (7, 7) and manifest["buckets"] == local["buckets"]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="shards/shards/")["Contents"])
    assert len(keys) == len(_tree(tmp_path / "local")) == len(manifest["shards"])
    remote = {}
    for key in keys:  # same rows as the local run (content hashes differ: S3 fingerprints are ETags)
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()))
        remote.update(
            {r["id"]: (r["bucket"], r["image"], tuple(r["input_ids"]), tuple(r["labels"])) for r in table.to_pylist()}
        )
    assert remote == _rows_by_id(tmp_path / "local")


def test_cli_contract(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "a.jsonl", good_set(root)[:3])
    write_jsonl(root / "b.jsonl", [rec("b1", "img/good0.jpg"), rec("b2", "img/absent.jpg")])
    cli = str(Path(sys.executable).parent / "convllava")
    args = [cli, "preprocess", "--annotations", str(root / "a.jsonl"), "--annotations", str(root / "b.jsonl"),
            "--image-root", str(root), "--output", str(tmp_path / "out"), "--resolution", "256", "--workers", "1"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr  # 1 of 5 quarantined = 20% > the default 10% limit
    assert "1 of 5 samples quarantined" in done.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert all(isinstance(manifest[k], int) for k in ("read", "written", "quarantined"))
    assert manifest["sources"]["b"] == {"available": 2, "read": 2, "written": 1, "quarantined": 1}
    assert json.loads((tmp_path / "out/quarantine.jsonl").read_text())["id"] == "b2"
    shutil.rmtree(tmp_path / "out")
    ok = subprocess.run(args[:4] + args[6:], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert ok.returncode == 0, ok.stderr
    assert "read 3 = written 3 + quarantined 0" in ok.stdout


def test_tokenization_is_a_preprocess_option_in_the_hash():
    from pipelines.worker import build_processor

    default, llava = PreprocessConfig(resolution=256), PreprocessConfig(resolution=256, tokenization="llava")
    assert build_processor(default).config.tokenization == "one_pass"
    assert build_processor(llava).config.tokenization == "llava"
    assert llava.output_hash() != default.output_hash()
    before = {k: v for k, v in default.to_dict().items()  # the default hashes as before the option existed
              if k not in ("tokenization", "max_quarantine_fraction", "unit_size", "workers")}  # fmt: skip
    assert default.output_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(ConfigError, match=r"preprocess config: tokenization: must be one of \('one_pass', 'llava'\)"):
        PreprocessConfig(tokenization="bpe")


def test_llava_tokenization_shards_hold_the_released_models_tokens(ray_local, tmp_path, vicuna_tokenizer_dir):
    from convllava.processor import ConvLlavaProcessor, ProcessorConfig
    from convllava.tokenizer import load_tokenizer

    root = tmp_path / "data"
    records = good_set(root, n=2)
    manifest = run(root, records, tmp_path / "out", tokenizer=str(vicuna_tokenizer_dir), tokenization="llava")
    assert manifest["written"] == 3 and manifest["config"]["tokenization"] == "llava"
    proc = ConvLlavaProcessor(
        load_tokenizer(vicuna_tokenizer_dir), ProcessorConfig(max_length=256, tokenization="llava")
    )
    dummy = proc.tokenizer.convert_tokens_to_ids("▁")
    by_id = {r["id"]: r for r in records}
    for row in rows(tmp_path / "out"):
        sizes = [] if row["bucket"] == "text" else [tuple(map(int, row["bucket"].split("x")))]
        want = proc.tokenize(by_id[row["id"]]["conversations"], sizes)
        assert (row["input_ids"], row["labels"]) == (want.input_ids, want.labels)
        if sizes:  # "<image>\nWhat …": the dummy-prefix ▁ right after the visual tokens
            after = row["input_ids"].index(proc.image_token_id) + row["num_image_tokens"]
            assert row["input_ids"][after] == dummy and row["labels"][after] == -100

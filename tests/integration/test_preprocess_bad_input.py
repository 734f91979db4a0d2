"""The preprocessing pipeline on hostile input: every bad record is quarantined with its reason and the counts
reconcile; odd image modes are handled; the too-long policy and the quarantine limit."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from preprocess_harness import ASK, conv, good_set, rec, rows, run, save

from convllava.data.shards import read_quarantine
from convllava.io.storage import Store
from pipelines.preprocess import QuarantineLimitExceeded

pytestmark = pytest.mark.integration


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
        "missing": "missing_file",
        "empty": "empty_file",
        "notimage": "unreadable_image",
        "truncated": "unreadable_image",
        "bomb": "decompression_bomb",
        "toosmall": "too_small",
        "dotdot": "path_escape",
        "absolute": "path_escape",
        "symlink": "path_escape",
        "noconv": "malformed_record",
        "alternate": "malformed_record",
        "notag": "malformed_record",
        "twotags": "malformed_record",
        "emptyturn": "malformed_record",
        "masked": "preflight",
        "multi": "unsupported",
        "good0": "duplicate_id",
        "line-": "malformed_record",
    }
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


def test_every_bad_input_is_quarantined_with_its_reason_and_counts_reconcile(ray_local, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    good = good_set(root)
    bad, expected = hostile_set(root, outside)
    odd = odd_modes_set(root)
    # truncate policy: "toolong" is cut and kept, "masked" loses every reply to the cut → preflight.
    config = dict(max_pixels=1_000_000, too_long="truncate", max_quarantine_fraction=1.0)
    manifest = run(root, good + bad + odd, tmp_path / "out", **config)
    quarantine = read_quarantine(Store(str(tmp_path / "out")))
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

"""The preprocessing config and CLI contract: errors name the key, unwritable output fails first, exit codes
and manifest of `convllava preprocess`, tokenization as an option in the output hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from preprocess_harness import good_set, rec, write_jsonl

from convllava.data.preprocess_config import SHARD_BYTES
from convllava.data.shards import read_quarantine
from convllava.io.config import ConfigLoadError
from convllava.io.storage import OutputError, Store
from pipelines.config import Mixture, PreprocessConfig, Source
from pipelines.preprocess import run_preprocess

pytestmark = pytest.mark.integration


def test_config_errors_name_the_key_and_unwritable_output_fails_first(tmp_path):
    (tmp_path / "c.yaml").write_text("resolution: 256\nresolutoin: 512\n")
    with pytest.raises(ConfigLoadError, match=r"c\.yaml: resolutoin: unknown key; known keys: \[.*'resolution'"):
        PreprocessConfig.from_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigLoadError, match="resolution"):
        PreprocessConfig(resolution=300)
    for name in ("unit_size", "shard_rows", "shard_bytes", "row_group_rows", "row_group_bytes"):
        with pytest.raises(ConfigLoadError, match=f"preprocess config: {name}: must be >= 1, got 0"):
            PreprocessConfig(**{name: 0})
    # Shard and row-group sizes come from YAML like any key; they cut files, so the output hash stays.
    (tmp_path / "s.yaml").write_text("resolution: 256\nshard_rows: 500\nrow_group_bytes: 4096\n")
    sized = PreprocessConfig.from_yaml(tmp_path / "s.yaml")
    assert (sized.shard_rows, sized.row_group_bytes, sized.shard_bytes) == (500, 4096, SHARD_BYTES)
    assert sized.output_hash() == PreprocessConfig(resolution=256).output_hash()
    (tmp_path / "m.yaml").write_text("sources:\n  - {name: a, annotations: a.jsonl, image_root: ., weight: 2}\n")
    with pytest.raises(
        ConfigLoadError, match=r"m\.yaml: sources\[0\]\.weight: unknown key; known keys: \['annotations'"
    ):
        Mixture.from_yaml(tmp_path / "m.yaml")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    mixture = Mixture(sources=(Source(name="a", annotations=str(tmp_path / "a.jsonl"), image_root=str(tmp_path)),))
    with pytest.raises(OutputError, match="not writable.*nothing was processed"):
        run_preprocess(mixture, PreprocessConfig(resolution=256), str(blocker / "out"), echo=lambda *_: None)


def test_cli_contract(tmp_path):
    root = tmp_path / "data"
    write_jsonl(root / "a.jsonl", good_set(root)[:3])
    write_jsonl(root / "b.jsonl", [rec("b1", "img/good0.jpg"), rec("b2", "img/absent.jpg")])
    cli = str(Path(sys.executable).parent / "convllava")
    args = [
        cli,
        "preprocess",
        "--annotations",
        str(root / "a.jsonl"),
        "--annotations",
        str(root / "b.jsonl"),
        "--image-root",
        str(root),
        "--output",
        str(tmp_path / "out"),
        "--resolution",
        "256",
        "--workers",
        "1",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr  # 1 of 5 quarantined = 20% > the default 10% limit
    assert "1 of 5 samples quarantined" in done.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert all(isinstance(manifest[k], int) for k in ("read", "written", "quarantined"))
    assert manifest["sources"]["b"] == {"available": 2, "read": 2, "written": 1, "quarantined": 1}
    assert [q["id"] for q in read_quarantine(Store(str(tmp_path / "out")))] == ["b2"]
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
    before = {
        k: v
        for k, v in default.to_dict().items()  # the default hashes as before the option existed
        if k
        not in (
            "tokenization",
            "max_quarantine_fraction",
            "unit_size",
            "workers",
            "threads",
            "shard_rows",
            "shard_bytes",
            "row_group_rows",
            "row_group_bytes",
        )
    }
    assert default.output_hash() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(
        ConfigLoadError, match=r"^PreprocessConfig: tokenization: Input should be 'one_pass' or 'llava'"
    ):
        PreprocessConfig(tokenization="bpe")


def test_actors_share_the_cpus_with_their_threads():
    """(actors, threads each): one thread per actor up to 8 actors, then up to 8 threads; the user's numbers win."""
    assert PreprocessConfig().actors(2) == (2, 1)
    assert PreprocessConfig().actors(16) == (8, 2)
    assert PreprocessConfig().actors(96) == (12, 8)
    assert PreprocessConfig(workers=2).actors(2) == (2, 1)
    assert PreprocessConfig(threads=1).actors(4) == (4, 1)
    assert PreprocessConfig(workers=3, threads=2).actors(2) == (3, 2)
    with pytest.raises(ConfigLoadError, match="threads: must be >= 1"):
        PreprocessConfig(threads=0)

"""A full disk and an unwritable output, for shards and for checkpoints: a clear error before work is lost.

The disks are real: small tmpfs mounts (the machines run the suite as root), filled by the platform's own writes,
so every error seen here is the kernel's ENOSPC or EROFS, not a stand-in.
"""

from __future__ import annotations

import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobs.train.config import CONFIG_DIR, StageConfig


@contextmanager
def disk(path: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted at `path` for the duration (contents are lost at the end)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs at {path} to simulate the disk ({done.stderr.strip()}); "
            "these tests need root (CAP_SYS_ADMIN)"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def tiny(data: Path, **changes) -> StageConfig:
    return StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage1.yaml").replace(data=str(data), **changes)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    from pipelines.demo.data import generate_demo_data

    root = tmp_path_factory.mktemp("disk-data")
    generate_demo_data(root, seed=0, n_caption=48, n_instruct=0, n_eval=0, with_photos=False)
    return root


def _index(output: Path) -> dict[str, str]:
    from convllava.data.shards import read_index
    from convllava.io.storage import Store

    return {k: e["status"] for k, e in read_index(Store(str(output))).items()}


def test_preprocessing_onto_a_full_disk_keeps_what_it_finished_and_a_rerun_completes(ray_local, raw, tmp_path):
    from convllava.data.shards import MANIFEST, ShardSet
    from convllava.io.storage import OutputError
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.preprocess import run_preprocess

    mixture = Mixture.from_yaml(raw / "mixture.yaml")
    # shard_rows=8: the units' parts merge into several shard files per bucket, not one.
    config = PreprocessConfig(resolution=256, unit_size=4, workers=2, shard_rows=8)
    reference = run_preprocess(mixture, config, str(tmp_path / "reference"), echo=lambda *_: None).manifest
    sizes = sorted(p.stat().st_size for p in (tmp_path / "reference").glob("shards/*/*.parquet"))
    assert len(sizes) >= 6 and reference.read == 48

    # Room for 1.25 times the merged shards: the run's records under `_work/` (a quarter of that room) and the units'
    # parts (one file per bucket a unit touches, merged only once every unit is done: in 4k pages and with Parquet
    # footers they take about twice the merged size) fit for about half of the units, the rest do not. Measured: 0.5
    # left no unit room once `_work/` moved into the output (0 of 48 in CI); 0.75, 1.0 and 1.25 finish 12, 16, 24.
    room_k = sum(sizes) * 5 // 4 // 4096 * 4
    with disk(tmp_path / "disk", f"{room_k}k") as output:
        with pytest.raises(OutputError) as failure:
            run_preprocess(mixture, config, str(output), echo=lambda *_: None)
        message = str(failure.value)
        print(f"\nfull disk: {message}")
        assert f"output {output}: preprocessing stopped" in message and "No space left on device" in message
        assert "previous index and manifest are unchanged" in message
        done = int(
            re.search(
                r"the (\d+) samples finished are kept in their shard files and a rerun processes "
                r"only the rest",
                message,
            ).group(1)
        )
        assert 0 < done < 48  # some units finished before the disk filled
        assert not list(output.rglob("*.tmp-*"))  # no half-written file left to fill the disk further
        assert not (output / MANIFEST).exists()  # nothing claims to be a finished output

        resize(output, "16m")  # space freed: the same command finishes the job
        lines: list[str] = []
        manifest = run_preprocess(mixture, config, str(output), echo=lines.append).manifest
        # Every finished unit is recovered from its parts, and so is each part a failed unit wrote before the one
        # that did not fit (a unit writes one part per bucket it touches).
        resumed = manifest.run.resumed
        assert resumed >= done and f"{resumed} samples finished by an interrupted run are reused" in lines[1]
        assert manifest.run.processed == 48 - resumed
        assert manifest.reconciled and manifest.read == 48
        assert manifest.written == reference.written and manifest.quarantined == reference.quarantined
        assert _index(output) == _index(tmp_path / "reference")  # nothing lost, nothing twice
        assert len(ShardSet(str(output))) == reference.written
        on_disk = sorted(str(p.relative_to(output)) for p in output.glob("shards/*/*.parquet"))
        assert on_disk == sorted(s.path for s in manifest.shards)  # no stray shard left behind


def test_preprocessing_into_a_read_only_disk_fails_before_any_work(ray_local, raw, tmp_path):
    from convllava.io.storage import OutputError
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.preprocess import run_preprocess

    with disk(tmp_path / "ro", "1m", read_only=True) as output:
        with pytest.raises(
            OutputError, match=f"output {output}/shards is not writable .*Read-only file system.*nothing was processed"
        ):
            run_preprocess(
                Mixture.from_yaml(raw / "mixture.yaml"),
                PreprocessConfig(resolution=256),
                str(output / "shards"),
                echo=lambda *_: None,
            )


def test_checkpoint_storage_without_room_or_write_access_fails_before_training(shards, tmp_path):
    from jobs.tracking.runs import client, default_tracking_uri
    from jobs.train.driver import CheckpointStorageError, check_storage, checkpoint_bytes, run_stage

    tracking = default_tracking_uri(tmp_path)
    config = tiny(shards, max_steps=2, keep_last=2)
    need = checkpoint_bytes(config)
    # The estimate is close to what a checkpoint really takes: the tiny stage-1 checkpoint takes 11 MiB on disk.
    assert 8 * 2**20 < need < 24 * 2**20

    with disk(tmp_path / "small", "8m") as storage:
        with pytest.raises(CheckpointStorageError) as failure:
            run_stage(config, str(storage), tracking_uri=tracking)
        message = str(failure.value)
        print(f"\nsmall disk: {message}")
        assert f"checkpoint storage {storage} has 8.0 MiB free but stage1 needs about" in message
        assert (
            "for 3 more checkpoints of" in message
            and "(keep_last=2, plus the one being written, less 0 already there)" in message
            and "nothing was trained" in message
        )
        assert not any(storage.iterdir())  # no run directory, no partial checkpoint

    with disk(tmp_path / "resume", "16m") as storage:  # room for one more checkpoint, not for three
        with pytest.raises(CheckpointStorageError, match="for 3 more checkpoints"):
            check_storage(str(storage), str(storage), None, config, "stage1")
        for step in (2, 4):  # a run being resumed already holds keep_last checkpoints: it needs room for one more
            (storage / "stage1" / f"checkpoint_{step:06d}").mkdir(parents=True)
        check_storage(str(storage), str(storage), None, config, "stage1")

    with disk(tmp_path / "ro", "64m", read_only=True) as storage:
        with pytest.raises(
            CheckpointStorageError,
            match=f"checkpoint storage {storage}/runs cannot be created.*Read-only file system.*nothing was trained",
        ):
            run_stage(config, str(storage / "runs"), tracking_uri=tracking)
        with pytest.raises(
            CheckpointStorageError, match=f"checkpoint storage {storage} is not writable.*nothing was trained"
        ):
            run_stage(config, str(storage), tracking_uri=tracking)

    assert client(tracking).get_experiment_by_name("convllava") is None  # no MLflow run was ever opened

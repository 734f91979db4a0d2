"""Storage faults: S3 errors, dropped connections and outages between the platform and its object store.

Every test puts `FaultProxy` between the clients (pyarrow: `convllava.io.storage`, inside Ray Train's workers and
controller too) and moto's server by pointing `AWS_ENDPOINT_URL` at the proxy, injects faults, and asserts what a
user relies on: transient faults are retried and lose nothing, a checkpoint whose upload failed is never recorded, a
store that stays down fails the run with a clear error instead of hanging.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import pytest

from jobs.train.checkpoints import CheckpointIncomplete, verify_checkpoint
from jobs.train.config import CONFIG_DIR, StageConfig

from .faultproxy import FaultProxy

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the run's checkpoints


def tiny(data: Path, **changes) -> StageConfig:
    return StageConfig.from_yaml(CONFIG_DIR / "tiny" / "stage1.yaml").replace(data=str(data), **changes)


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory, demo_shards_builder) -> Path:
    return demo_shards_builder(tmp_path_factory.mktemp("fault-data"), 48, 16, 2)


@pytest.fixture()
def proxy(s3_server, s3_bucket, monkeypatch):
    """A fault proxy in front of moto; `AWS_ENDPOINT_URL` points at it (moto's endpoint is restored afterwards)."""
    with FaultProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        yield proxy


@pytest.fixture()
def moto(s3_server):
    """A boto3 client straight to moto: what is really in the bucket, whatever the proxy does."""
    return boto3.client("s3", endpoint_url=s3_server)


def _keys(moto, bucket: str, prefix: str) -> list[str]:
    pages = moto.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _download(moto, bucket: str, prefix: str, dest: Path) -> Path:
    for key in _keys(moto, bucket, prefix.rstrip("/") + "/"):
        rel = key[len(prefix) :].lstrip("/")
        if rel and not rel.endswith("/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            moto.download_file(bucket, key, str(dest / rel))
    return dest


def _checkpoints(moto, bucket: str, run: str) -> list[str]:
    """Names of the checkpoint directories under the run's prefix (complete or not)."""
    names = {k[len(run) + 1 :].split("/")[0] for k in _keys(moto, bucket, run + "/")}
    return sorted(n for n in names if n.startswith("checkpoint_0"))


def _recorded(moto, bucket: str, run: str) -> list[str]:
    """Checkpoint directory names Ray Train recorded in its snapshot, oldest first (the last one is the latest)."""
    snapshot = json.loads(moto.get_object(Bucket=bucket, Key=f"{run}/{SNAPSHOT}")["Body"].read())
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    names = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    assert names[-1] == latest, snapshot
    return names


@pytest.mark.integration
def test_transient_upload_failures_are_retried_and_lose_nothing(shards, proxy, moto, s3_bucket, tmp_path):
    from jobs.train.driver import run_stage

    # The first checkpoint's model loses its connection twice in a row; every 4th object/part upload fails with
    # SlowDown, every 9th multipart create/complete with InternalError. No request fails more than twice: pyarrow's
    # retry strategy makes 3 attempts. (A third failure is test_an_upload_that_fails_for_good_is_never_recorded.)
    proxy.max_faults_per_request = 2
    proxy.fail_next(2, status=None, methods=["PUT"], path="checkpoint_000001/model/model.safetensors")
    proxy.fail_every(4, status=503, methods=["PUT"])
    proxy.fail_every(9, status=500, methods=["POST"])
    config = tiny(shards, max_steps=2, checkpoint_every=1, max_failures=0)

    result = run_stage(config, f"s3://{s3_bucket}/runs", run_name="flaky")

    assert result.steps == 2
    assert result.checkpoint_uri == f"s3://{s3_bucket}/runs/flaky/checkpoint_000002"
    assert proxy.injected["PUT drop"] == 2 and proxy.injected["PUT 503"] > 0 and proxy.injected["POST 500"] > 0
    print(f"\nfaults injected: {dict(proxy.injected)} in {proxy.requests} requests ({dict(proxy.seen)})")
    assert (
        _checkpoints(moto, s3_bucket, "runs/flaky")
        == _recorded(moto, s3_bucket, "runs/flaky")
        == ["checkpoint_000001", "checkpoint_000002"]
    )
    for step in (1, 2):  # every byte of every checkpoint arrived: both ranks' markers verify
        local = _download(moto, s3_bucket, f"runs/flaky/checkpoint_{step:06d}", tmp_path / f"ckpt{step}")
        assert verify_checkpoint(local, config.workers)["step"] == step


@pytest.mark.integration
def test_an_upload_that_fails_for_good_is_never_recorded(shards, proxy, moto, s3_bucket, tmp_path):
    from jobs.tracking.runs import client, default_tracking_uri
    from jobs.train.driver import run_stage

    # The final checkpoint's consolidated model can never be uploaded: its multipart upload starts, every attempt at
    # its part fails. Everything else (the checkpoint's other files, the first checkpoint, Ray's records) goes through.
    # pyarrow's copy_files, which Ray uploads with, ignores that error: the upload itself must be checked.
    proxy.set_down(methods=["PUT"], path="checkpoint_000002/model/model.safetensors?partNumber")
    config = tiny(shards, max_steps=2, checkpoint_every=1, max_failures=0)
    tracking = default_tracking_uri(tmp_path)

    with pytest.raises(RuntimeError, match="stage stage1 failed") as failure:
        run_stage(config, f"s3://{s3_bucket}/runs", tracking_uri=tracking, run_name="broken")

    message = str(failure.value)
    print(f"\nrun_stage raised: {message[:400]} [...] {message[-400:]}\nfaults injected: {dict(proxy.injected)}")
    assert "checkpoint_000002: uploading to" in message and "lost ['model/model.safetensors']" in message
    assert proxy.injected == {"PUT 503": 3}  # the part upload was tried 3 times before giving up
    runs = client(tracking).search_runs([client(tracking).get_experiment_by_name("convllava").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

    recorded = _recorded(moto, s3_bucket, "runs/broken")
    assert recorded == ["checkpoint_000001"]  # the latest recorded checkpoint is the last complete one
    latest = _download(moto, s3_bucket, f"runs/broken/{recorded[-1]}", tmp_path / "latest")
    assert verify_checkpoint(latest, config.workers)["step"] == 1
    assert _checkpoints(moto, s3_bucket, "runs/broken") == ["checkpoint_000001", "checkpoint_000002"]
    partial = _download(moto, s3_bucket, "runs/broken/checkpoint_000002", tmp_path / "partial")
    assert (partial / "COMPLETE.rank0.json").is_file()  # every other file arrived, markers included ...
    with pytest.raises(CheckpointIncomplete, match="model/model.safetensors is missing"):  # ... yet it never passes
        verify_checkpoint(partial, config.workers)


@pytest.mark.integration
def test_a_store_that_stays_down_fails_the_run_cleanly(shards, proxy, s3_bucket, tmp_path):
    from jobs.tracking.runs import client, default_tracking_uri
    from jobs.train.driver import CheckpointStorageError, run_stage

    proxy.set_down(status=None)  # every connection is dropped without a response
    config = tiny(shards, max_steps=2, checkpoint_every=1, max_failures=1)
    tracking = default_tracking_uri(tmp_path)

    start = time.monotonic()
    with pytest.raises(CheckpointStorageError, match="nothing was trained") as failure:
        run_stage(config, f"s3://{s3_bucket}/runs", tracking_uri=tracking, run_name="down")
    elapsed = time.monotonic() - start

    message = str(failure.value)
    print(f"\nrun_stage raised after {elapsed:.1f}s: {message}\nfaults injected: {dict(proxy.injected)}")
    assert f"checkpoint storage s3://{s3_bucket}/runs is not writable" in message  # where ...
    assert "NETWORK_CONNECTION" in message  # ... and the cause
    assert proxy.faults > 0 and proxy.forwarded == 0
    assert client(tracking).get_experiment_by_name("convllava") is None  # checked before any run was opened


def test_preprocessing_to_a_down_store_fails_before_processing(proxy, s3_bucket, tmp_path):
    from convllava.io.storage import OutputError
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo.data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    generate_demo_data(tmp_path / "data", seed=0, n_caption=4, n_instruct=4, n_eval=0, with_photos=False)
    proxy.set_down(status=503)
    output = f"s3://{s3_bucket}/shards"
    lines: list[str] = []

    with pytest.raises(OutputError, match=f"output {output} is not writable.*nothing was processed"):
        run_preprocess(
            Mixture.from_yaml(tmp_path / "data" / "mixture.yaml"),
            PreprocessConfig(resolution=256),
            output,
            echo=lines.append,
        )

    assert lines == []  # failed before reading a single sample
    assert proxy.faults > 0 and proxy.forwarded == 0


def test_storage_reads_survive_transient_errors(proxy, moto, s3_bucket, tmp_path):
    from convllava.io.storage import download_prefix
    from convllava.processing.tokenizer import TINY_TOKENIZER_DIR, load_tokenizer

    files = sorted(p for p in Path(TINY_TOKENIZER_DIR).rglob("*") if p.is_file())
    for path in files:
        moto.upload_file(str(path), s3_bucket, f"tok/{path.relative_to(TINY_TOKENIZER_DIR).as_posix()}")

    proxy.fail_next(2, status=503, methods=["GET"])  # the listing, then a download
    proxy.fail_next(1, status=None, methods=["GET"], path="tokenizer")  # one dropped connection on a file
    local = download_prefix(f"s3://{s3_bucket}/tok", tmp_path / "tok")
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == [
        p.relative_to(TINY_TOKENIZER_DIR) for p in files
    ]
    assert all((local / p.relative_to(TINY_TOKENIZER_DIR)).read_bytes() == p.read_bytes() for p in files)
    first = proxy.faults

    proxy.fail_next(2, status=500, methods=["GET"])  # through load_tokenizer's own download (a fresh cache)
    tokenizer = load_tokenizer(f"s3://{s3_bucket}/tok")
    reference = load_tokenizer("tiny")
    assert tokenizer("a red circle").input_ids == reference("a red circle").input_ids
    print(f"\nfaults injected: {dict(proxy.injected)}")
    assert (first, proxy.faults) == (3, 5)

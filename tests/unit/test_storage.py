"""The storage layer (`convllava.io.storage`) on local disk, and how it builds its S3 filesystem."""

from __future__ import annotations

import pickle

import pytest

from convllava.io.storage import Store, download_prefix, read_bytes, s3_filesystem, upload_dir, write_bytes


def _settings(fs) -> dict:
    """What a pickled S3FileSystem carries to another process (pyarrow pickles its constructor arguments)."""
    return pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]


def test_s3_filesystem_takes_endpoint_and_region_from_the_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    fs = s3_filesystem()
    assert fs.region == "eu-west-3"  # AWS_REGION first, as the AWS CLI and SDKs do
    assert _settings(fs)["endpoint_override"] == "http://127.0.0.1:9"
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert s3_filesystem().region == "us-west-2" and _settings(s3_filesystem())["endpoint_override"].endswith(":10")


def test_only_a_portable_s3_filesystem_carries_the_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-example")
    assert _settings(s3_filesystem()).get("access_key") in (None, "")  # each process reads its own AWS chain
    portable = _settings(s3_filesystem(portable=True))  # Ray Train's controller gets no shared secrets
    assert (portable["access_key"], portable["secret_key"]) == ("AKIDEXAMPLE", "secret-example")


def test_a_local_store_writes_whole_files_and_lists_them(tmp_path):
    store = Store(str(tmp_path / "out") + "/")
    store.check_writable()
    store.write_text("a/b/c.txt", "hello")
    store.write_bytes("top.bin", b"\x00\x01")
    assert store.read_bytes("a/b/c.txt") == b"hello" and store.read_bytes("missing") is None
    assert store.list_files("") == ["a/b/c.txt", "top.bin"] and store.list_files("a") == ["a/b/c.txt"]
    assert store.listing("a")["a/b/c.txt"].size == 5 and store.list_files("nothing") == []
    assert not list((tmp_path / "out").rglob("*.tmp-*"))  # temp files were renamed into place
    store.delete("top.bin")
    store.delete("top.bin")  # deleting what is gone is fine
    assert not store.exists("top.bin") and store.exists("a/b/c.txt")
    write_bytes(tmp_path / "x" / "y.json", b"{}")
    assert read_bytes(tmp_path / "x" / "y.json") == b"{}"
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "x" / "absent.json")


def test_upload_then_download_mirrors_a_tree_on_s3(s3_bucket, tmp_path):
    src = tmp_path / "src"
    for rel, data in {"config.json": b"{}", "sub/weights.bin": bytes(range(256)) * 64}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uri = f"s3://{s3_bucket}/tree"
    assert upload_dir(src, uri) == 2
    assert Store(uri).list_files("") == ["config.json", "sub/weights.bin"]
    dest = download_prefix(uri, tmp_path / "dest")
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == {
        "config.json": b"{}",
        "sub/weights.bin": bytes(range(256)) * 64,
    }
    assert read_bytes(f"{uri}/config.json") == b"{}"
    with pytest.raises(FileNotFoundError, match=f"no objects under s3://{s3_bucket}/absent"):
        download_prefix(f"s3://{s3_bucket}/absent", tmp_path / "none")

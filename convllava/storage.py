"""Local paths and `s3://` URIs behind one small interface.

S3 goes through boto3's standard credential chain; the endpoint comes from the environment
(`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`), so MinIO, Ceph or moto work the same as AWS.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/prefix` → ("bucket", "key/prefix")."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def s3_client():
    import boto3  # imported on use: local-only users never pay for it

    return boto3.client("s3")


def cache_root() -> Path:
    return Path(os.environ.get("CONVLLAVA_CACHE", Path.home() / ".cache" / "convllava"))


def download_prefix(uri: str, dest: Path | None = None) -> Path:
    """Mirror every object under an `s3://` prefix into a local directory (skipping unchanged files).

    Raises:
        FileNotFoundError: nothing exists under the prefix.
    """
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/")
    dest = dest or cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    client = s3_client()
    paginator = client.get_paginator("list_objects_v2")
    found = 0
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :].lstrip("/")
            if not rel or rel.endswith("/"):
                continue
            target = dest / rel
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ValueError(f"{uri}: object key {obj['Key']!r} escapes the download directory")
            found += 1
            if target.is_file() and target.stat().st_size == obj["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    if not found:
        raise FileNotFoundError(f"no objects under {uri}")
    return dest


def upload_dir(local: str | os.PathLike, uri: str) -> int:
    """Upload every file below `local` to the `s3://` prefix `uri`; returns the number of files."""
    bucket, prefix = split_s3(uri)
    client = s3_client()
    count = 0
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(root).as_posix()]))
        client.upload_file(str(path), bucket, key)
        count += 1
    return count


def resolve_local(path_or_uri: str | os.PathLike) -> Path:
    """A local directory for a local path or an `s3://` prefix (downloaded to the cache)."""
    if is_s3(path_or_uri):
        return download_prefix(str(path_or_uri))
    path = Path(path_or_uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path

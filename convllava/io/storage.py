"""Local paths and `s3://` URIs behind one storage layer: pyarrow's filesystems.

Every read, write, listing, download and upload of the project goes through here. S3 is one `pyarrow.fs.S3FileSystem`
built by `s3_filesystem`: credentials from the standard AWS chain, the endpoint from `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL` (so MinIO, Ceph or moto work the same as AWS), the region from `AWS_REGION` /
`AWS_DEFAULT_REGION`, and the retry strategy set there once. It is also what Ray Train's `storage_filesystem` takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# AWS's standard strategy: 3 attempts per request with backoff (throttling, 5xx and dropped connections).
# A pickled S3FileSystem loses its retry strategy and falls back to pyarrow's default, which is this same one.
S3_RETRY = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
COPY_CHUNK = 8 << 20


class OutputError(OSError):
    """An output location cannot be written; raised before any work is done."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem(portable: bool = False) -> pafs.S3FileSystem:
    """The project's S3 filesystem.

    Args:
        portable: carry this process's `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` inside
            the filesystem. Ray Train pickles its `storage_filesystem` into a controller that gets no shared secrets
            (see `pipelines.ray_runtime.adopt_secrets`): keys that live only in the driver's environment must
            travel inside the filesystem, or the controller's requests go out unsigned. Otherwise each process
            uses the default AWS chain.
    """
    keys = {}
    if portable and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        keys = {
            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
    return pafs.S3FileSystem(
        endpoint_override=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        retry_strategy=S3_RETRY,
        allow_bucket_creation=False,
        **keys,
    )


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a local path or an `s3://` URI; the path has no scheme and no trailing slash."""
    text = str(uri)
    if is_s3(text):
        path = text[len("s3://") :].rstrip("/")
        if not path.split("/", 1)[0]:
            raise ValueError(f"s3 URI without a bucket: {text!r}")
        return s3_filesystem(), path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))


def listing(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    """Every file below `root` in `fs` (sizes and modification times included), by path relative to `root`;
    {} when nothing is there. One listing request per 1000 objects on S3."""
    root = root.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    return {i.path[len(root) + 1 :]: i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of one file or object.

    Raises:
        FileNotFoundError: there is none. IsADirectoryError: it is a directory.
    """
    if not is_s3(uri):
        return Path(uri).read_bytes()
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write one file or object (parent folders created); see `Store.write_bytes`."""
    fs, path = filesystem(uri)
    parent, _, name = path.rpartition("/")
    Store(f"s3://{parent}" if is_s3(uri) else parent).write_bytes(name, data)


class Store:
    """One location — a local directory or an `s3://` prefix — read and written by paths relative to it.

    Local writes go to a temp file that is renamed into place (readers never see half a file, a full disk keeps
    no half-written file); S3 objects appear whole when their upload completes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.remote = is_s3(self.uri)

    def path(self, rel: str) -> str:
        """`rel`'s path in `self.fs`."""
        return f"{self.root}/{rel}" if rel else self.root

    def check_writable(self) -> None:
        """Create the root and write + delete a probe file, or raise OutputError saying why."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            if not self.remote:
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except OSError as e:
            raise OutputError(f"output {self.uri} is not writable ({e}); nothing was processed") from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.remote:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        os.replace(tmp, target)  # atomic on local disks

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's content, None when there is none."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file (only `columns` when given)."""
        return pq.read_table(self.path(rel), columns=columns, filesystem=self.fs)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def listing(self, prefix: str = "") -> dict[str, pafs.FileInfo]:
        """Every file under `prefix`, by path relative to the root."""
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        return {base + rel: info for rel, info in listing(self.fs, self.path(prefix.rstrip("/"))).items()}

    def list_files(self, prefix: str) -> list[str]:
        """Paths (relative to the root) of every file under `prefix`, sorted; [] when there is none."""
        return sorted(self.listing(prefix))

    def download(self, dest: Path) -> int:
        """Mirror every file below the root into `dest`, skipping files already there with the same size;
        returns how many files the root holds."""
        found = self.listing()
        for rel, info in sorted(found.items()):
            target = dest / rel
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ValueError(f"{self.uri}: object key {rel!r} escapes the download directory")
            if target.is_file() and target.stat().st_size == info.size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with self.fs.open_input_stream(info.path) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return len(found)

    def upload(self, local: str | os.PathLike) -> int:
        """Copy every file below the local directory `local` to the same relative paths here; returns the count."""
        root = Path(local)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            target = self.path(path.relative_to(root).as_posix())
            if not self.remote:
                os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            # Closed by `with`: a failed upload raises here instead of being ignored when the stream is destroyed.
            with open(path, "rb") as src, self.fs.open_output_stream(target) as out:
                shutil.copyfileobj(src, out, COPY_CHUNK)
        return len(files)


def cache_root() -> Path:
    return Path(os.environ.get("CONVLLAVA_CACHE", Path.home() / ".cache" / "convllava"))


def download_prefix(uri: str, dest: Path | None = None) -> Path:
    """Mirror every object under an `s3://` prefix into a local directory (by default in the cache under
    `$CONVLLAVA_CACHE`), skipping files already there with the same size.

    Raises:
        FileNotFoundError: nothing exists under the prefix.
    """
    dest = dest or cache_root() / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not Store(uri).download(dest):
        raise FileNotFoundError(f"no objects under {uri}")
    return dest


def upload_dir(local: str | os.PathLike, uri: str) -> int:
    """Upload every file below `local` to the prefix `uri` (local or `s3://`); returns the number of files."""
    return Store(uri).upload(local)


def resolve_local(path_or_uri: str | os.PathLike) -> Path:
    """A local directory for a local path or an `s3://` prefix (downloaded to the cache)."""
    if is_s3(path_or_uri):
        return download_prefix(str(path_or_uri))
    path = Path(path_or_uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path

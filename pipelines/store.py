"""The preprocessing output location — a local directory or an `s3://` prefix — through pyarrow's filesystems.

pyarrow's S3 filesystem takes its endpoint from `AWS_ENDPOINT_URL` (set it in the workers' environment for
S3-compatible stores) and its credentials from the standard AWS chain.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from convllava.storage import is_s3


class OutputError(OSError):
    """The output location cannot be written; raised before any work is done."""


class OutputStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        if is_s3(self.uri):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            self.fs = pafs.S3FileSystem(
                endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                allow_bucket_creation=False,
            )  # fmt: skip
            self.root = self.uri[len("s3://") :]
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(self.uri)

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def check_writable(self) -> None:
        """Create the root and write + delete a probe file, or raise OutputError saying why."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            if not is_s3(self.uri):
                os.makedirs(self.root, exist_ok=True)
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except OSError as e:
            raise OutputError(f"output {self.uri} is not writable ({e}); nothing was processed") from e

    def write_bytes(self, path: str, data: bytes) -> None:
        parent = self._full(path).rsplit("/", 1)[0]
        if not is_s3(self.uri):
            os.makedirs(parent, exist_ok=True)
        tmp = f"{self._full(path)}.tmp-{uuid.uuid4().hex[:8]}" if not is_s3(self.uri) else self._full(path)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
        except BaseException:
            if tmp != self._full(path):  # a full disk keeps no half-written temp file
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            raise
        if tmp != self._full(path):
            os.replace(tmp, self._full(path))  # atomic on local disks: readers never see half a file

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode("utf-8"))

    def write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        # No dictionary pages whose layout depends on writer state: identical rows → identical bytes.
        pq.write_table(table, sink, compression="zstd", use_dictionary=False)
        self.write_bytes(path, sink.getvalue().to_pybytes())

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._full(path)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_table(self, path: str) -> pa.Table:
        return pq.read_table(self._full(path), filesystem=self.fs)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(self._full(path)).type != pafs.FileType.NotFound

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(self._full(path))
        except FileNotFoundError:
            pass

    def list_files(self, prefix: str) -> list[str]:
        """Paths (relative to the root) of every file under `prefix`, sorted; [] when there is none."""
        selector = pafs.FileSelector(self._full(prefix), recursive=True, allow_not_found=True)
        root = self.root + "/"
        return sorted(i.path[len(root) :] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def local_path(self, path: str) -> str | None:
        return None if is_s3(self.uri) else self._full(path)

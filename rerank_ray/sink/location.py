"""Where a run writes: the output root resolved once, its fixed sub-paths, and file helpers.

Layout under the output root (every name starting with ``_`` is skipped by readers of the
partitioned data, e.g. pyarrow.dataset and DuckDB)::

    run_date=.../part-<run_id>-*.parquet   scored rows (Hive partitions)
    _rejects/part-<run_id>-*.parquet       rejected rows
    _staging/<run_id>/...                  a run's files until it commits
    _manifests/<run_id>.json, _SUCCESS     the commit point
    _locks/<partition>.lock                one run per output partition at a time
    _exports/<run_id>/...                  job modes' reports and exports

The driver moves and deletes objects through ``OutputLocation``'s own methods, never through
pyarrow's ``S3FileSystem.move``/``delete_*``: those create an empty "directory marker" object
for a parent prefix that would otherwise vanish (``_staging/``, ``_locks/``, the root), and
such objects break tools that mirror a prefix to disk. On S3 they use boto3 directly; on local
disk they remove the directories they leave empty.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from rerank_ray import schema, storage

STAGING_DIR = "_staging"
PROGRESS_DIR = "_progress"
MANIFESTS_DIR = "_manifests"
LOCKS_DIR = "_locks"
EXPORTS_DIR = "_exports"


@dataclass(frozen=True)
class OutputLocation:
    """The output root of one run. Pickled to write tasks, which resolve the filesystem (and
    with it the credentials) on their own machine: only the URI and S3 settings travel."""

    uri: str
    s3: storage.S3Settings
    run_id: str

    @functools.cached_property
    def _resolved(self) -> tuple[pafs.FileSystem, str]:
        return storage.resolve(self.uri, self.s3)

    @functools.cached_property
    def client(self):
        """The driver's boto3 S3 client (credentials from the default AWS chain)."""
        return self.s3.boto3_client()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_resolved", "client")}

    @property
    def is_s3(self) -> bool:
        return storage.is_s3(self.uri)

    @property
    def fs(self) -> pafs.FileSystem:
        return self._resolved[0]

    @property
    def base(self) -> str:
        return self._resolved[1]

    def path(self, *parts: str) -> str:
        """A path under the output root."""
        return storage.join(self.base, *parts)

    @property
    def staging(self) -> str:
        return self.path(STAGING_DIR, self.run_id)

    @property
    def progress(self) -> str:
        return self.path(STAGING_DIR, self.run_id, PROGRESS_DIR)

    @property
    def manifest(self) -> str:
        return self.path(MANIFESTS_DIR, f"{self.run_id}.json")

    @property
    def success(self) -> str:
        return self.path(schema.MANIFEST_NAME)

    @property
    def exports(self) -> str:
        return self.path(EXPORTS_DIR, self.run_id)

    def lock(self, run_date: str, partition_by: list[str]) -> str:
        """The lock object of the partition this run writes."""
        key = f"{schema.RUN_DATE}={run_date}" if schema.RUN_DATE in partition_by else "output"
        return self.path(LOCKS_DIR, f"{key}.lock")

    def display(self, path: str) -> str:
        """``path`` as the user wrote the location (``s3://...`` or local)."""
        return storage.display(self.uri, path)

    def relative(self, path: str) -> str:
        """``path`` relative to the output root."""
        return path[len(self.base) + 1 :]

    def check_writable(self) -> None:
        """Write and delete a probe object, so a bad bucket or permission fails before
        scoring. Leaves nothing behind (no empty ``_staging/``, no marker object)."""
        probe = self.path(STAGING_DIR, f".probe-{self.run_id}-{uuid.uuid4().hex[:6]}")
        try:
            write_bytes(self.fs, probe, b"ok")
            self.delete_file(probe)
        except (OSError, pa.ArrowException) as err:
            raise storage.StorageError(
                f"Output {self.uri} is not writable: {storage.describe_error(err)}. Fix the "
                "path or permissions, or choose another --output."
            ) from err

    # -- driver-side object operations (no directory markers; OSError on failure) --------------
    def exists(self, path: str) -> bool:
        """Whether a file is at ``path``."""
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def move(self, src: str, dst: str) -> None:
        """Move one file; ``FileNotFoundError`` when ``src`` is missing."""
        if not self.is_s3:
            make_dirs(self.fs, dst.rsplit("/", 1)[0])
            self.fs.move(src, dst)
            return
        (sb, sk), (db, dk) = src.split("/", 1), dst.split("/", 1)
        with _s3_errors(src):
            # The managed copy also handles objects over CopyObject's 5 GB limit.
            self.client.copy({"Bucket": sb, "Key": sk}, db, dk)
            self.client.delete_object(Bucket=sb, Key=sk)

    def delete_file(self, path: str) -> None:
        """Delete one file if it exists (and, locally, the directories it leaves empty)."""
        if self.is_s3:
            bucket, key = path.split("/", 1)
            with _s3_errors(path):
                self.client.delete_object(Bucket=bucket, Key=key)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)
        self.prune(path.rsplit("/", 1)[0])

    def delete_files(self, paths: list[str]) -> None:
        """Delete files (missing ones are fine); on S3 a thousand per request."""
        if not self.is_s3:
            for path in paths:
                self.delete_file(path)
            return
        for start in range(0, len(paths), 1000):
            batch = paths[start : start + 1000]
            bucket = batch[0].split("/", 1)[0]
            keys = [{"Key": p.split("/", 1)[1]} for p in batch if p.startswith(bucket + "/")]
            with _s3_errors(batch[0]):
                reply = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
                )
            if failed := reply.get("Errors"):
                raise OSError(f"S3 could not delete {len(failed)} object(s), e.g. {failed[0]}")

    def delete_tree(self, path: str, last: str | None = None) -> None:
        """Delete ``path`` and everything below it, if it exists; ``last`` (a file below it)
        is deleted only after everything else."""
        below = pafs.FileSelector(path, recursive=True, allow_not_found=True)
        files = [i.path for i in self.fs.get_file_info(below) if i.is_file and i.path != last]
        self.delete_files(files)
        if last is not None:
            self.delete_file(last)
        if not self.is_s3:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(path)
            self.prune(path.rsplit("/", 1)[0])

    def prune(self, directory: str) -> None:
        """Locally, remove ``directory`` and its parents while empty, up to (not including)
        the output root; object stores have no directories."""
        if self.is_s3:
            return
        while directory.startswith(self.base + "/"):
            try:
                os.rmdir(directory)
            except OSError:  # not empty, or already gone
                return
            directory = directory.rsplit("/", 1)[0]


@contextlib.contextmanager
def _s3_errors(path: str):
    """boto3 errors as ``OSError`` (``FileNotFoundError`` for a missing key), as pyarrow
    raises them, so callers handle one kind of storage error."""
    try:
        yield
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchKey"):
            raise FileNotFoundError(f"s3://{path} does not exist") from err
        raise OSError(f"S3 request for s3://{path} failed: {err}") from err
    except BotoCoreError as err:
        raise OSError(f"S3 request for s3://{path} failed: {err}") from err


def list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Every file below ``path`` (none when it does not exist)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    return [i.path for i in infos if i.is_file]


def read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is missing or unreadable."""
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def make_dirs(fs: pafs.FileSystem, *paths: str) -> None:
    """Create local directories; object stores have none to create."""
    if isinstance(fs, pafs.LocalFileSystem):
        for path in paths:
            fs.create_dir(path, recursive=True)


def write_bytes(fs: pafs.FileSystem, path: str, body: bytes) -> None:
    """Write ``body`` to ``path`` whole or not at all (an S3 put is atomic; locally a
    temporary file is renamed into place), creating local parent directories."""
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as fh:
            fh.write(body)
        return
    make_dirs(fs, path.rsplit("/", 1)[0])
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(body)
    fs.move(tmp, path)

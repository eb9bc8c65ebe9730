"""Where a run writes: the output root resolved once, its fixed sub-paths, and file helpers.

Layout under the output root (every name starting with ``_`` is skipped by readers of the
partitioned data, e.g. pyarrow.dataset and DuckDB)::

    run_date=.../part-<run_id>-*.parquet   scored rows (Hive partitions)
    _rejects/part-<run_id>-*.parquet       rejected rows
    _staging/<run_id>/...                  a run's files until it commits
    _manifests/<run_id>.json, _SUCCESS     the commit point
    _locks/<partition>.lock                one run per output partition at a time
    _exports/<run_id>/...                  job modes' reports and exports
"""

from __future__ import annotations

import contextlib
import functools
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

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

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_resolved"}

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
        scoring."""
        fs = self.fs
        probe = self.path(STAGING_DIR, f".probe-{self.run_id}-{uuid.uuid4().hex[:6]}")
        try:
            write_bytes(fs, probe, b"ok")
            fs.delete_file(probe)
        except (OSError, pa.ArrowException) as err:
            raise storage.StorageError(
                f"Output {self.uri} is not writable: {storage.describe_error(err)}. Fix the "
                "path or permissions, or choose another --output."
            ) from err


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
    """Write ``body`` to ``path``, creating local parent directories."""
    make_dirs(fs, path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as fh:
        fh.write(body)


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` and everything below it, if it exists."""
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)

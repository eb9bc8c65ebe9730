"""Write scored rows as Hive-partitioned Parquet and rejected rows under ``_rejects/``.

How a run becomes visible, and only when complete:

1. Write tasks put their files under ``<output>/_staging/<run_id>/``. After its data files,
   each task writes a progress marker (``_progress/<uuid>.json``) saying which files hold
   how many rows of which input shard. Marker after data: a marker implies its files exist.
2. When every task has finished, the driver checks the row counts (rows read == scored +
   rejected + filtered), moves the staged files into place, writes the manifest
   (``_manifests/<run_id>.json``, then ``_SUCCESS``) — the commit point, listing the run's
   files — and only then deletes files of an earlier commit of the same run id, so a rerun
   replaces its output and never duplicates it.
3. A run killed before its commit leaves its staging directory. Rerunning with the same
   ``--run-id`` keeps the staged files of every shard whose rows are all accounted for by
   markers, deletes the rest, and reads only the unfinished shards (``resume_state``).

A lock object per output partition (``_locks/run_date=YYYY-MM-DD.lock``, created with an
exclusive create) stops two runs from writing the same partition at once.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from rerank_ray import schema, storage

STAGING_DIR = "_staging"
PROGRESS_DIR = "_progress"
MANIFESTS_DIR = "_manifests"
LOCKS_DIR = "_locks"
# Column Ray Data adds with include_paths=True: the input file a row came from.
SOURCE_COLUMN = "path"


class RowCountError(RuntimeError):
    """Rows out differ from rows in; the run is not committed."""


class ConcurrentRunError(RuntimeError):
    """Another run is writing the same output partition."""


@dataclass
class Entry:
    """Rows of one input shard (``source``) written by one write task, and where."""

    source: str | None
    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    filtered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    filtered_reasons: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.scored + self.rejected + self.filtered


@dataclass
class Totals:
    """Sums over entries, for the row-count check and the manifest."""

    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    filtered: int = 0
    reasons: Counter = field(default_factory=Counter)
    filtered_reasons: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Totals:
        t = cls()
        for e in entries:
            t.scored += e.scored
            t.rejected += e.rejected
            t.truncated += e.truncated
            t.filtered += e.filtered
            t.reasons.update(e.reasons)
            t.filtered_reasons.update(e.filtered_reasons)
            t.files.extend(e.files)
        return t

    @property
    def rows(self) -> int:
        return self.scored + self.rejected + self.filtered


def check_output_writable(output_uri: str, s3: storage.S3Settings, run_id: str) -> None:
    """Write and delete a probe object, so a bad bucket or permission fails before scoring."""
    fs, base = storage.resolve(output_uri, s3)
    probe = storage.join(base, STAGING_DIR, f".probe-{run_id}-{uuid.uuid4().hex[:6]}")
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(storage.join(base, STAGING_DIR), recursive=True)
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as err:
        raise storage.StorageError(
            f"Output {output_uri} is not writable: {storage.describe_error(err)}. Fix the path "
            "or permissions, or choose another --output."
        ) from err


# ----------------------------------------------------------------------------------------
# Locks: one run per output partition at a time
# ----------------------------------------------------------------------------------------


def lock_path(base: str, run_date: str, partition_by: list[str]) -> str:
    key = f"{schema.RUN_DATE}={run_date}" if schema.RUN_DATE in partition_by else "output"
    return storage.join(base, LOCKS_DIR, f"{key}.lock")


def acquire_lock(output_uri: str, s3: storage.S3Settings, run_id: str, path: str) -> None:
    """Create the lock object exclusively; the same run id may take over its own lock."""
    body = json.dumps(
        {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    ).encode()
    if storage.is_s3(output_uri):
        created = _create_exclusive_s3(s3, path, body)
    else:
        created = _create_exclusive_local(path, body)
    if created:
        return
    holder = _read_lock(output_uri, s3, path)
    if holder.get("run_id") == run_id:
        return  # resuming our own run after it was killed
    shown = storage.display(output_uri, path)
    raise ConcurrentRunError(
        f"Output {output_uri} is being written by run {holder.get('run_id')} (started "
        f"{holder.get('started')} on {holder.get('host')}), which holds the lock {shown}. "
        f"Wait for it to finish; if it is dead, resume it with --run-id {holder.get('run_id')} "
        "or delete the lock object."
    )


def release_lock(output_uri: str, s3: storage.S3Settings, run_id: str, path: str) -> None:
    """Delete the lock object if this run holds it."""
    if _read_lock(output_uri, s3, path).get("run_id") != run_id:
        return
    fs, _ = storage.resolve(output_uri, s3)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_file(path)


def _create_exclusive_local(path: str, body: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(body)
    return True


def _create_exclusive_s3(s3: storage.S3Settings, path: str, body: bytes) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = path.split("/", 1)
    try:
        s3.boto3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return False
        raise
    return True


def _read_lock(output_uri: str, s3: storage.S3Settings, path: str) -> dict[str, Any]:
    fs, _ = storage.resolve(output_uri, s3)
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read() or b"{}")
    except (FileNotFoundError, OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------
# Resume: what a killed run of the same id already staged
# ----------------------------------------------------------------------------------------


@dataclass
class ResumeState:
    """Staged work of an earlier attempt of this run id that can be kept."""

    entries: list[Entry]
    done_sources: set[str]

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


def resume_state(
    output_uri: str, s3: storage.S3Settings, run_id: str, rows_per_source: dict[str, int]
) -> ResumeState:
    """Keep the staged files of shards whose rows are all accounted for; delete the rest.

    A shard counts as done when its markers' rows add up to exactly its row count (from the
    Parquet footer). Anything else staged (files of unfinished shards, files of a task that
    died before its marker) is deleted, and those shards are read and scored again.
    """
    fs, base = storage.resolve(output_uri, s3)
    staging = storage.join(base, STAGING_DIR, run_id)
    markers_dir = storage.join(staging, PROGRESS_DIR)
    entries: list[Entry] = []
    for info in _list_files(fs, markers_dir):
        with fs.open_input_stream(info) as fh:
            entries.extend(Entry(**e) for e in json.loads(fh.read()))
    seen: Counter = Counter()
    for e in entries:
        seen[e.source] += e.rows
    done = {
        src for src, rows in seen.items() if src in rows_per_source and rows == rows_per_source[src]
    }
    kept = [e for e in entries if e.source in done]
    keep_files = {f for e in kept for f in e.files}
    for path in _list_files(fs, staging):
        if path not in keep_files:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.delete_file(path)
    if kept:
        _write_bytes(
            fs,
            storage.join(markers_dir, "resumed.json"),
            json.dumps([asdict(e) for e in kept]).encode(),
        )
    return ResumeState(entries=kept, done_sources=done)


def discard_staging(output_uri: str, s3: storage.S3Settings, run_id: str) -> None:
    fs, base = storage.resolve(output_uri, s3)
    _delete_dir(fs, storage.join(base, STAGING_DIR, run_id))


# ----------------------------------------------------------------------------------------
# The sink
# ----------------------------------------------------------------------------------------


class RerankSink(Datasink[list]):
    """Ray Data sink: partitioned scored rows + rejects, staged, committed by a manifest.

    ``reject_columns`` are the columns a rejected row is written with (the input columns as
    read, plus ``reject_reason``). Rows whose reason is in ``filtered_reasons`` (e.g. a
    nightly run's ``below_top_k``) are left out on purpose: counted, not written.
    ``resumed`` holds the kept work of an earlier attempt of the same run id.
    """

    def __init__(
        self,
        output_uri: str,
        s3: storage.S3Settings,
        run_id: str,
        run_date: str,
        partition_by: list[str],
        expected_rows: int,
        manifest_extra: dict[str, Any],
        reject_columns: list[str] | None = None,
        filtered_reasons: tuple[str, ...] = (),
        resumed: ResumeState | None = None,
        rows_per_file: int = 200_000,
        late_manifest_extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.output_uri = output_uri
        self.s3 = s3
        self.run_id = run_id
        self.run_date = run_date
        self.partition_by = list(partition_by)
        self.expected_rows = expected_rows
        self.manifest_extra = manifest_extra
        self.reject_columns = reject_columns
        self.filtered_reasons = tuple(filtered_reasons)
        self.resumed = resumed or ResumeState(entries=[], done_sources=set())
        self.rows_per_file = rows_per_file
        self.started = time.time()
        self.manifest: dict[str, Any] | None = None
        # Driver only (called at commit, e.g. to join a hash running in a thread): not sent to
        # the write tasks, which never commit.
        self._late_manifest_extra = late_manifest_extra

    @property
    def min_rows_per_write(self) -> int:
        """Ray Data bundles blocks until a write task has this many rows: scored rows arrive
        in blocks of a batch, and without it every block would be a file of its own."""
        return self.rows_per_file

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_late_manifest_extra"] = None
        return state

    # -- on the workers --------------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx) -> list:
        fs, base = storage.resolve(self.output_uri, self.s3)
        staging = storage.join(base, STAGING_DIR, self.run_id)
        entries: list[Entry] = []
        pending: list[pa.Table] = []
        pending_rows = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            # Files of at most rows_per_file rows, each followed by its progress marker, also
            # when a block is larger: the marker granularity bounds what a killed run redoes.
            offset = 0
            while offset < table.num_rows:
                take = min(self.rows_per_file - pending_rows, table.num_rows - offset)
                pending.append(table.slice(offset, take))
                pending_rows += take
                offset += take
                if pending_rows >= self.rows_per_file:
                    entries.extend(self._flush(fs, staging, pending))
                    pending, pending_rows = [], 0
        if pending:
            entries.extend(self._flush(fs, staging, pending))
        return [asdict(e) for e in entries]

    def _flush(self, fs, staging: str, tables: list[pa.Table]) -> list[Entry]:
        """Write buffered rows, then their progress marker (so a marker implies its files)."""
        entries = self._write_tables(fs, staging, tables)
        marker = storage.join(staging, PROGRESS_DIR, f"{uuid.uuid4().hex}.json")
        _write_bytes(fs, marker, json.dumps([asdict(e) for e in entries]).encode())
        return entries

    def _write_tables(self, fs, staging: str, tables: list[pa.Table]) -> list[Entry]:
        table = pa.concat_tables(tables, promote_options="permissive")
        if SOURCE_COLUMN not in table.column_names:
            return [self._write_source(fs, staging, table, None)]
        sources = table[SOURCE_COLUMN]
        return [
            self._write_source(
                fs, staging, table.filter(pc.equal(sources, src)).drop_columns([SOURCE_COLUMN]), src
            )
            for src in pc.unique(sources).to_pylist()
        ]

    def _write_source(self, fs, staging: str, table: pa.Table, source: str | None) -> Entry:
        entry = Entry(source=source)
        rejected_mask = pc.is_valid(table[schema.REJECT_REASON])
        scored = table.filter(pc.invert(rejected_mask))
        rejected = table.filter(rejected_mask)
        if self.filtered_reasons and rejected.num_rows:
            drop = pc.is_in(rejected[schema.REJECT_REASON], pa.array(self.filtered_reasons))
            dropped = Counter(rejected.filter(drop)[schema.REJECT_REASON].to_pylist())
            entry.filtered_reasons = dict(dropped)
            entry.filtered = sum(dropped.values())
            rejected = rejected.filter(pc.invert(drop))
        tag = f"{self.run_id}-{uuid.uuid4().hex[:12]}"
        if scored.num_rows:
            scored = self._scored_table(scored)
            entry.scored = scored.num_rows
            entry.truncated = int(pc.sum(scored[schema.TRUNCATED]).as_py() or 0)
            pads.write_dataset(
                scored,
                base_dir=staging,
                filesystem=fs,
                format="parquet",
                partitioning=self.partition_by or None,
                partitioning_flavor="hive" if self.partition_by else None,
                basename_template=f"part-{tag}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                file_visitor=lambda f: entry.files.append(f.path),
                max_rows_per_group=64 * 1024,
            )
        if rejected.num_rows:
            if self.reject_columns is not None:
                keep = [c for c in self.reject_columns if c in rejected.column_names]
                rejected = rejected.select([*keep, schema.REJECT_REASON])
            else:
                rejected = rejected.drop_columns(
                    [c for c in schema.OUTPUT_COLUMNS if c in rejected.column_names]
                )
            entry.rejected = rejected.num_rows
            entry.reasons = dict(Counter(rejected[schema.REJECT_REASON].to_pylist()))
            path = storage.join(staging, schema.REJECTS_DIR, f"part-{tag}.parquet")
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(storage.join(staging, schema.REJECTS_DIR), recursive=True)
            pq.write_table(rejected, path, filesystem=fs)
            entry.files.append(path)
        return entry

    def _scored_table(self, table: pa.Table) -> pa.Table:
        table = table.drop_columns([schema.REJECT_REASON])
        if schema.RUN_DATE in self.partition_by and schema.RUN_DATE not in table.column_names:
            table = table.append_column(
                schema.RUN_DATE, pa.array([self.run_date] * table.num_rows, pa.string())
            )
        # Explicit column order: passthrough columns, then the job's own outputs.
        tail = [schema.SCORE, schema.SCORE_NORM, schema.TRUNCATED]
        head = [c for c in table.column_names if c not in tail]
        return table.select(head + tail)

    # -- on the driver ---------------------------------------------------------------------
    def on_write_complete(self, write_result) -> None:
        entries = [Entry(**e) for returned in write_result.write_returns for e in returned]
        self.commit(entries)

    def commit(self, new_entries: list[Entry]) -> dict[str, Any]:
        """Check the row counts, move staged files into place, write the manifest."""
        fs, base = storage.resolve(self.output_uri, self.s3)
        staging = storage.join(base, STAGING_DIR, self.run_id)
        totals = Totals.of([*self.resumed.entries, *new_entries])
        if totals.rows != self.expected_rows:
            _delete_dir(fs, staging)
            raise RowCountError(
                f"Run {self.run_id}: {self.expected_rows} rows were read but {totals.rows} came "
                f"out ({totals.scored} scored + {totals.rejected} rejected + {totals.filtered} "
                f"filtered). Nothing was committed to {self.output_uri}; rerun the job."
            )
        late = self._late_manifest_extra() if self._late_manifest_extra else {}
        previous = _read_json(fs, storage.join(base, MANIFESTS_DIR, f"{self.run_id}.json"))
        committed = _move_all(fs, staging, base, totals.files)
        wall = time.time() - self.started
        rel = sorted(p[len(base) + 1 :] for p in committed)
        new_rows = sum(e.rows for e in new_entries)
        self.manifest = {
            "run_id": self.run_id,
            "run_date": self.run_date,
            "status": "committed",
            "rows_read": self.expected_rows,
            "rows_scored": totals.scored,
            "rows_rejected": totals.rejected,
            "rows_truncated": totals.truncated,
            "rejects_by_reason": dict(sorted(totals.reasons.items())),
            "rows_filtered": totals.filtered,
            "filtered_by_reason": dict(sorted(totals.filtered_reasons.items())),
            "rows_resumed": self.resumed.rows,
            "rows_processed_this_attempt": new_rows,
            "wall_time_s": round(wall, 3),
            "pairs_per_s": round(sum(e.scored for e in new_entries) / wall, 2)
            if wall > 0
            else None,
            "replaced_previous_commit": bool(previous),
            "files": rel,
            **self.manifest_extra,
            **late,
        }
        body = json.dumps(self.manifest, indent=2).encode()
        _write_bytes(fs, storage.join(base, MANIFESTS_DIR, f"{self.run_id}.json"), body)
        _write_bytes(fs, storage.join(base, schema.MANIFEST_NAME), body)
        # After the commit point: remove what an earlier commit of this run id wrote.
        stale = set((previous or {}).get("files", [])) - set(rel)
        for path in stale:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.delete_file(storage.join(base, path))
        _delete_dir(fs, staging)
        return self.manifest


def _list_files(fs: pafs.FileSystem, path: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return []
    return [i.path for i in infos if i.is_file]


def _move_all(fs: pafs.FileSystem, staging: str, base: str, files: list[str]) -> list[str]:
    """Move staged files to the same relative place under ``base``."""
    targets = [storage.join(base, f[len(staging) + 1 :]) for f in files]
    local = isinstance(fs, pafs.LocalFileSystem)

    def move(pair: tuple[str, str]) -> None:
        src, dst = pair
        if local:
            fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        fs.move(src, dst)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(move, zip(files, targets, strict=True)))
    return targets


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_bytes(fs: pafs.FileSystem, path: str, body: bytes) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(body)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)

"""Write scored rows as Hive-partitioned Parquet and rejected rows under ``_rejects/``.

Writes are staged: each write task puts its files under ``<output>/_staging/<run_id>/``.
When every task has finished, the driver checks the row counts (rows read == rows scored +
rows rejected), moves the staged files into place, and writes the manifest last:
``<output>/_manifests/<run_id>.json`` and ``<output>/_SUCCESS``. The manifest is the commit
point and lists the run's files, so readers can tell committed files from anything else.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from rerank_ray import schema, storage

STAGING_DIR = "_staging"
MANIFESTS_DIR = "_manifests"
# Rows buffered per write task before a file is written: fewer, larger files.
ROWS_PER_FILE = 200_000


class RowCountError(RuntimeError):
    """Rows out differ from rows in; the run is not committed."""


@dataclass
class WriteStats:
    """What one write task wrote (returned to the driver)."""

    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    filtered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    filtered_reasons: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def add(self, other: WriteStats) -> None:
        self.scored += other.scored
        self.rejected += other.rejected
        self.truncated += other.truncated
        self.filtered += other.filtered
        self.files.extend(other.files)
        for mine, theirs in (
            (self.reasons, other.reasons),
            (self.filtered_reasons, other.filtered_reasons),
        ):
            for reason, count in theirs.items():
                mine[reason] = mine.get(reason, 0) + count


def check_output_writable(output_uri: str, s3: storage.S3Settings, run_id: str) -> None:
    """Write and delete a probe object, so a bad bucket or permission fails before scoring."""
    fs, base = storage.resolve(output_uri, s3)
    probe = storage.join(base, STAGING_DIR, run_id, ".write-probe")
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(storage.join(base, STAGING_DIR, run_id), recursive=True)
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except (OSError, pa.ArrowException) as err:
        raise storage.StorageError(
            f"Output {output_uri} is not writable: {storage.describe_error(err)}. Fix the path "
            "or permissions, or choose another --output."
        ) from err


class RerankSink(Datasink[WriteStats]):
    """Ray Data sink: partitioned scored rows + rejects, staged, committed by a manifest.

    ``reject_columns`` are the columns a rejected row is written with (the input columns as
    read, plus ``reject_reason``). Rows whose reason is in ``filtered_reasons`` (e.g. a
    nightly run's ``below_top_k``) are left out on purpose: counted, not written.
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
        self.started = time.time()
        self.manifest: dict[str, Any] | None = None

    # -- on the workers --------------------------------------------------------------------
    def write(self, blocks: Iterable[Any], ctx) -> WriteStats:
        fs, base = storage.resolve(self.output_uri, self.s3)
        staging = storage.join(base, STAGING_DIR, self.run_id)
        stats = WriteStats()
        pending: list[pa.Table] = []
        pending_rows = 0
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            if table.num_rows == 0:  # e.g. an empty group output; it may even lack columns
                continue
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= ROWS_PER_FILE:
                self._write_tables(fs, staging, pending, stats)
                pending, pending_rows = [], 0
        if pending:
            self._write_tables(fs, staging, pending, stats)
        return stats

    def _write_tables(self, fs, staging: str, tables: list[pa.Table], stats: WriteStats) -> None:
        table = pa.concat_tables(tables, promote_options="permissive")
        reasons = table[schema.REJECT_REASON]
        rejected_mask = pc.is_valid(reasons)
        scored = table.filter(pc.invert(rejected_mask))
        rejected = table.filter(rejected_mask)
        if self.filtered_reasons and rejected.num_rows:
            drop = pc.is_in(rejected[schema.REJECT_REASON], pa.array(self.filtered_reasons))
            for reason, count in Counter(
                rejected.filter(drop)[schema.REJECT_REASON].to_pylist()
            ).items():
                stats.filtered_reasons[reason] = stats.filtered_reasons.get(reason, 0) + count
                stats.filtered += count
            rejected = rejected.filter(pc.invert(drop))
        tag = f"{self.run_id}-{uuid.uuid4().hex[:12]}"
        if scored.num_rows:
            scored = self._scored_table(scored)
            stats.scored += scored.num_rows
            stats.truncated += int(pc.sum(scored[schema.TRUNCATED]).as_py() or 0)
            pads.write_dataset(
                scored,
                base_dir=staging,
                filesystem=fs,
                format="parquet",
                partitioning=self.partition_by or None,
                partitioning_flavor="hive" if self.partition_by else None,
                basename_template=f"part-{tag}-{{i}}.parquet",
                existing_data_behavior="overwrite_or_ignore",
                file_visitor=lambda f: stats.files.append(f.path),
                max_rows_per_group=64 * 1024,
            )
        if rejected.num_rows:
            rejected = rejected.drop_columns(
                [
                    c
                    for c in (schema.SCORE, schema.SCORE_NORM, schema.TRUNCATED)
                    if c in rejected.column_names
                ]
            )
            stats.rejected += rejected.num_rows
            for reason, count in Counter(rejected[schema.REJECT_REASON].to_pylist()).items():
                stats.reasons[reason] = stats.reasons.get(reason, 0) + count
            path = storage.join(staging, schema.REJECTS_DIR, f"part-{tag}.parquet")
            if isinstance(fs, pafs.LocalFileSystem):
                fs.create_dir(storage.join(staging, schema.REJECTS_DIR), recursive=True)
            pq.write_table(rejected, path, filesystem=fs)
            stats.files.append(path)

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
        totals = WriteStats()
        for stats in write_result.write_returns:
            totals.add(stats)
        fs, base = storage.resolve(self.output_uri, self.s3)
        staging = storage.join(base, STAGING_DIR, self.run_id)
        rows_out = totals.scored + totals.rejected + totals.filtered
        if rows_out != self.expected_rows:
            _delete_dir(fs, staging)
            raise RowCountError(
                f"Run {self.run_id}: {self.expected_rows} rows were read but {rows_out} came out "
                f"({totals.scored} scored + {totals.rejected} rejected + {totals.filtered} "
                f"filtered). Nothing was committed to {self.output_uri}; rerun the job."
            )
        committed = _move_all(fs, staging, base, totals.files)
        _delete_dir(fs, staging)
        wall = time.time() - self.started
        rel = [p[len(base) + 1 :] for p in committed]
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
            "wall_time_s": round(wall, 3),
            "pairs_per_s": round(totals.scored / wall, 2) if wall > 0 else None,
            "files": sorted(rel),
            **self.manifest_extra,
        }
        body = json.dumps(self.manifest, indent=2, sort_keys=False).encode()
        _write_bytes(fs, storage.join(base, MANIFESTS_DIR, f"{self.run_id}.json"), body)
        _write_bytes(fs, storage.join(base, schema.MANIFEST_NAME), body)

    def on_write_failed(self, error: Exception) -> None:
        fs, base = storage.resolve(self.output_uri, self.s3)
        _delete_dir(fs, storage.join(base, STAGING_DIR, self.run_id))


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


def _write_bytes(fs: pafs.FileSystem, path: str, body: bytes) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(body)


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(path)

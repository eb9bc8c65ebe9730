"""The Ray Data sink: scored rows as Hive-partitioned Parquet, rejected rows under ``_rejects/``.

Write tasks put their files under ``<output>/_staging/<run_id>/``. After its data files, each
task writes a progress marker (``_progress/<uuid>.json``) saying which files hold how many rows
of which input shard: marker after data, so a marker implies its files exist (``resume.py``
reads them). When every task has finished, the driver commits (``commit.py``).
Files are written with explicit Arrow schemas (``schema.scored_schema`` /
``schema.rejects_schema``): passthrough columns as read, then the job's own columns.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from rerank_ray import schema, storage
from rerank_ray.sink.commit import commit
from rerank_ray.sink.location import OutputLocation, make_dirs, write_bytes
from rerank_ray.sink.records import Entry
from rerank_ray.sink.resume import ResumeState
from rerank_ray.trace import CallTrace

# Column Ray Data adds with include_paths=True: the input file a row came from.
SOURCE_COLUMN = "path"


class RerankSink(Datasink[list]):
    """Ray Data sink: partitioned scored rows + rejects, staged, committed by a manifest.

    ``reject_columns`` are the columns a rejected row is written with (the input columns as
    read, plus ``reject_reason``). Rows whose reason is in ``filtered_reasons`` (e.g. a
    nightly run's ``below_top_k``) are left out on purpose: counted, not written.
    ``resumed`` holds the kept work of an earlier attempt of the same run id. ``chunked``
    (``long_docs: chunk``): scored rows carry ``num_chunks`` and ``best_chunk`` too.
    """

    def __init__(
        self,
        out: OutputLocation,
        run_date: str,
        partition_by: list[str],
        expected_rows: int,
        manifest_extra: dict[str, Any],
        reject_columns: list[str] | None = None,
        filtered_reasons: tuple[str, ...] = (),
        resumed: ResumeState | None = None,
        rows_per_file: int = 200_000,
        late_manifest_extra: Callable[[], dict[str, Any]] | None = None,
        chunked: bool = False,
    ) -> None:
        self.out = out
        self.run_date = run_date
        self.partition_by = list(partition_by)
        self.expected_rows = expected_rows
        self.manifest_extra = manifest_extra
        self.reject_columns = reject_columns
        self.filtered_reasons = tuple(filtered_reasons)
        self.resumed = resumed or ResumeState()
        self.rows_per_file = rows_per_file
        self.chunked = chunked
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
        start = time.time()
        fs, staging = self.out.fs, self.out.staging
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
        CallTrace("write", self.out.run_id).record(start, time.time(), sum(e.rows for e in entries))
        return [asdict(e) for e in entries]

    def _flush(self, fs, staging: str, tables: list[pa.Table]) -> list[Entry]:
        """Write buffered rows, then their progress marker (so a marker implies its files)."""
        entries = self._write_tables(fs, staging, tables)
        marker = storage.join(self.out.progress, f"{uuid.uuid4().hex}.json")
        write_bytes(fs, marker, json.dumps([asdict(e) for e in entries]).encode())
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
        tag = f"{self.out.run_id}-{uuid.uuid4().hex[:12]}"
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
                # On S3, creating "directories" writes empty marker objects (the output root's
                # among them) that no reader needs and that break mirroring the prefix to disk.
                create_dir=isinstance(fs, pafs.LocalFileSystem),
                file_visitor=lambda f: entry.files.append(f.path),
                max_rows_per_group=64 * 1024,
            )
        if rejected.num_rows:
            if self.reject_columns is not None:
                keep = [c for c in self.reject_columns if c in rejected.column_names]
                rejected = rejected.select([*keep, schema.REJECT_REASON])
            else:
                own = (*schema.OUTPUT_COLUMNS, *(schema.CHUNK_COLUMNS if self.chunked else ()))
                rejected = rejected.drop_columns([c for c in own if c in rejected.column_names])
            entry.rejected = rejected.num_rows
            entry.reasons = dict(Counter(rejected[schema.REJECT_REASON].to_pylist()))
            target = schema.rejects_schema(rejected.schema)
            rejected = rejected.select(target.names).cast(target)
            path = storage.join(staging, schema.REJECTS_DIR, f"part-{tag}.parquet")
            make_dirs(fs, storage.join(staging, schema.REJECTS_DIR))
            pq.write_table(rejected, path, filesystem=fs)
            entry.files.append(path)
        return entry

    def _scored_table(self, table: pa.Table) -> pa.Table:
        table = table.drop_columns([schema.REJECT_REASON])
        if schema.RUN_DATE in self.partition_by and schema.RUN_DATE not in table.column_names:
            table = table.append_column(
                schema.RUN_DATE, pa.array([self.run_date] * table.num_rows, pa.string())
            )
        target = schema.scored_schema(table.schema, chunked=self.chunked)
        return table.select(target.names).cast(target)

    # -- on the driver ---------------------------------------------------------------------
    def on_write_complete(self, write_result) -> None:
        entries = [Entry(**e) for returned in write_result.write_returns for e in returned]
        self.commit(entries)

    def commit(self, new_entries: list[Entry]) -> dict[str, Any]:
        """Check the row counts, move staged files into place, write the manifest."""
        self.manifest = commit(
            self.out,
            [*self.resumed.entries, *new_entries],
            lock=self.out.lock(self.run_date, self.partition_by),
            new_entries=new_entries,
            expected_rows=self.expected_rows,
            run_date=self.run_date,
            started=self.started,
            resumed_rows=self.resumed.rows,
            extra=self.manifest_extra,
            late_extra=self._late_manifest_extra,
        )
        return self.manifest

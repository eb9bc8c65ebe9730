"""The per-query step as a Ray Data stage: blocks of whole queries in; the mode's rows, export
shards and a small partial of the statistics out, so the driver only merges small objects.

Each block is one hash partition of the run's scored rows by ``query_id`` (the shuffle Ray's
``groupby().map_groups()`` does, with one call per block instead of one per query). A block
call, on a worker:

1. applies the mode's per-query function to all its queries at once;
2. writes each export of the block to ``_staging/<run_id>/_exports/<run_id>/<stem>-<key>``,
   where ``key`` names the block by its content, so a retried task overwrites its own files;
3. writes the mode's rows with the run's sink (staged Parquet, as a plain run's write task);
4. returns one row: a pickled ``BlockResult`` (sink entries, export files, partials).

The driver numbers the export shards (``<stem>-00000``, ...) in the order of their first
query id and commits them with the rows (``run.py``).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema, storage
from rerank_ray.modes.exports import write_jsonl, write_parquet
from rerank_ray.modes.ranking import split_rejected
from rerank_ray.sink import RerankSink
from rerank_ray.sink.location import make_dirs

RESULT_COLUMN = "block_result"


@dataclass(frozen=True)
class Export:
    """One export of a mode: ``stem`` is its path under ``_exports/<run_id>/`` with the
    extension (``flagembedding/train.jsonl``); ``build`` makes its records (JSONL, a list of
    dicts) or rows (Parquet, a Table) from a block of the mode's rows."""

    name: str
    stem: str
    build: Callable[[pa.Table, Any], list[dict] | pa.Table]

    def shard(self, directory: str, key: str) -> str:
        """The path of shard ``key`` (a block key, or a shard number) under ``directory``."""
        base, ext = self.stem.rsplit(".", 1)
        return storage.join(directory, f"{base}-{key}.{ext}")


@dataclass(frozen=True)
class ValueRange:
    """Lowest and highest finite value seen; adds up across blocks like the stats."""

    low: float = float("inf")
    high: float = float("-inf")

    def __add__(self, other: ValueRange) -> ValueRange:
        return ValueRange(min(self.low, other.low), max(self.high, other.high))

    @classmethod
    def of(cls, table: pa.Table, column: str) -> ValueRange:
        """The range of ``column`` over the scored rows of ``table`` (NaN skipped)."""
        scored, _ = split_rejected(table)
        values = pc.cast(scored[column], pa.float64())
        values = pc.filter(values, pc.invert(pc.is_nan(values)))
        bounds = pc.min_max(values)
        if bounds["min"].as_py() is None:
            return cls()
        return cls(bounds["min"].as_py(), bounds["max"].as_py())

    def as_tuple(self) -> tuple[float, float] | None:
        """(low, high), or None when no value was seen."""
        return (self.low, self.high) if self.low <= self.high else None


@dataclass
class BlockResult:
    """What one block call hands back to the driver (small: no rows)."""

    first_query: str = ""
    entries: list[dict] = field(default_factory=list)
    exports: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (path, rows)
    partials: dict[str, Any] = field(default_factory=dict)  # name -> object with __add__


def whole_query_blocks(ds, partitions: int):
    """``ds`` hash-partitioned by query id into ``partitions`` blocks, each holding whole
    queries: the shuffle ``GroupedData.map_groups`` runs before it maps blocks (Ray 2.60,
    ``ray/data/grouped_data.py``), so the same guarantee holds."""
    from ray.data.context import ShuffleStrategy

    hashed = (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.GPU_SHUFFLE)
    if ds.context.shuffle_strategy in hashed:
        return ds.repartition(partitions, keys=[schema.QUERY_ID], sort=True)
    return ds.repartition(partitions).sort(schema.QUERY_ID)


def process_block(
    table: pa.Table,
    *,
    group: Callable[[pa.Table, Any], pa.Table],
    exports: tuple[Export, ...],
    partials: Callable[[pa.Table, Any], dict[str, Any]],
    cfg: Any,
    sink: RerankSink,
) -> pa.Table:
    """One block of whole queries -> the mode's rows staged, export shards staged, partials."""
    result = BlockResult()
    if table.num_rows:
        rows = group(table, cfg)
        first = pc.min(rows[schema.QUERY_ID]).as_py()
        result.first_query = str(first)
        key = _block_key(rows)
        directory = storage.join(sink.out.staging, sink.out.relative(sink.out.exports))
        fs = sink.out.fs
        for export in exports:
            built = export.build(rows, cfg)
            count = len(built) if isinstance(built, list) else built.num_rows
            if count:
                path = export.shard(directory, key)
                _write(fs, path, built)
                result.exports[export.name] = (path, count)
        result.partials = partials(rows, cfg)
        result.entries = sink.write([rows], None)
    return pa.table({RESULT_COLUMN: pa.array([pickle.dumps(result)], pa.binary())})


def collect(ds) -> list[BlockResult]:
    """Run the stage; the block results (one small row per block) in first-query order."""
    results = [pickle.loads(row[RESULT_COLUMN]) for row in ds.iter_rows()]
    return sorted(results, key=lambda r: r.first_query)


def merge_partials(results: list[BlockResult]) -> dict[str, Any]:
    """Add up the blocks' partials by name (the driver's only aggregation)."""
    merged: dict[str, Any] = {}
    for result in results:
        for name, partial in result.partials.items():
            merged[name] = partial if name not in merged else merged[name] + partial
    return merged


def _block_key(rows: pa.Table) -> str:
    """A name for a block from its content: a retried call writes the same file names."""
    ids = rows[schema.QUERY_ID]
    text = f"{pc.min(ids).as_py()!r}|{pc.max(ids).as_py()!r}|{rows.num_rows}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write(fs, path: str, built: list[dict] | pa.Table) -> None:
    make_dirs(fs, path.rsplit("/", 1)[0])
    if isinstance(built, list):
        write_jsonl(iter(built), path, fs)
    else:
        write_parquet(built, path, fs)

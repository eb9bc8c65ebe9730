"""Read candidate-pair shards (Parquet or JSONL) into a Ray Dataset, checked up front.

Before anything is scored, the shards are listed and every shard's schema is read (Parquet
footers; JSONL is parsed and its text checked) so a missing column, a clashing column name, a
corrupt file or an unreachable bucket fails the run at once with a message naming the object
(the checks themselves are ``source_checks``'s). The footers also give the exact input row
count that the sink checks the output against. A Parquet data page is only decoded by the
read itself; when a run fails, ``find_unreadable_shard`` tells whether a shard that does not
decode was the cause.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from rerank_ray import storage
from rerank_ray.config import JobConfig
from rerank_ray.source_checks import (
    InputError,
    check_columns,
    may_be_bad_data,
    read_shard_schema,
    shard_problem,
)

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")


@dataclass(frozen=True)
class SourcePlan:
    """What the read will do: which files, in which format, how many rows, which columns."""

    uri: str
    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    format: str
    num_rows: int
    schema: pa.Schema  # input columns as read, before renaming
    rows_per_file: tuple[int, ...] = ()

    def rows_by_path(self) -> dict[str, int]:
        return dict(zip(self.paths, self.rows_per_file, strict=True))


def plan_source(
    cfg: JobConfig, s3: storage.S3Settings, reserved_columns: Collection[str] = ()
) -> SourcePlan:
    """List the input shards and check each one's columns; raise ``InputError`` if unusable.

    ``reserved_columns``: names that something after scoring adds (a job mode's ``rank``,
    ``label``...); like the job's own columns, an input column passed through may not have one.
    """
    fs, base = storage.resolve(cfg.input, s3)
    paths = _list_files(cfg.input, fs, base)
    fmt = _format_of(cfg, paths)
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda p: read_shard_schema(fs, p, cfg.input, fmt), paths))
    schemas = [file_schema for file_schema, _ in infos]
    counts = [rows for _, rows in infos]
    shown = [storage.display(cfg.input, p) for p in paths]
    check_columns(cfg, list(zip(shown, schemas, strict=True)), reserved_columns)
    return SourcePlan(
        uri=cfg.input,
        filesystem=fs,
        paths=tuple(paths),
        format=fmt,
        num_rows=sum(counts),
        schema=schemas[0],
        rows_per_file=tuple(counts),
    )


def read_dataset(plan: SourcePlan, cfg: JobConfig, paths: list[str] | None = None):
    """The lazy Ray Dataset of the input (or of ``paths``), with canonical column names.

    Each row carries the file it came from in a ``path`` column (Ray's ``include_paths``),
    so the sink can tell which shards are complete; when the input has a ``path`` column of
    its own, that tracking (and with it resume) is off.
    """
    import ray.data

    paths = list(plan.paths if paths is None else paths)
    common = {
        "filesystem": plan.filesystem,
        "file_extensions": None,
        "include_paths": not has_own_path_column(plan),
        # At least one block per shard: shards then flow (and finish) one by one, which
        # keeps the pipeline streaming and lets a killed run keep its finished shards.
        "override_num_blocks": len(paths),
    }
    if plan.format == "parquet":
        # Ray 2.60 reads Parquet with its V2 datasource by default. Measured here and on an
        # H200 node (bench/results/2026-11-22-h200-job-trace.json), V2 hands a small or
        # medium input to the next stage as ONE bundle, so one tokenize actor of the pool
        # gets every row and the job runs at one CPU core's tokenize rate; on a larger input
        # it spread the work but read ~4x slower than V1. The V1 reader gives one block per
        # shard to any free actor. The flag is read when the read is planned, so it is set
        # for this call only and the caller's DataContext is left as it was.
        ctx = ray.data.DataContext.get_current()
        use_v2 = getattr(ctx, "use_datasource_v2", None)
        if use_v2 is not None:
            ctx.use_datasource_v2 = False
        try:
            ds = ray.data.read_parquet(paths, columns=list(plan.schema.names), **common)
        except Exception as err:
            # Ray decodes the first rows of some shards here to size its blocks.
            raise_if_unreadable(plan, paths, cfg.run_id, err)
            raise
        finally:
            if use_v2 is not None:
                ctx.use_datasource_v2 = use_v2
    else:
        ds = ray.data.read_json(paths, **common)
    renames = {k: v for k, v in cfg.column_map.items() if k != v}
    if renames:
        ds = ds.rename_columns(renames)
    return ds


def find_unreadable_shard(plan: SourcePlan, paths: Iterable[str]) -> tuple[str, str] | None:
    """Read ``paths`` (shards of ``plan``) fully, here on the driver, and return the first one
    whose bytes do not decode, as (path as the user wrote it, what is wrong); else None.

    For a run that failed mid-way: the up-front check reads only Parquet footers, so a corrupt
    data page surfaces as a Ray read-task error that names no file. A shard that cannot be
    fetched (a storage outage) is not reported: the run's own error describes that. Reads 4
    shards at a time, each held whole in memory while it is decoded.
    """
    paths = list(paths)
    columns = list(plan.schema.names)
    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = pool.map(
            lambda p: shard_problem(plan.filesystem, p, plan.format, columns), paths
        )
        for path, problem in zip(paths, problems, strict=True):
            if problem is not None:
                pool.shutdown(wait=True, cancel_futures=True)
                return storage.display(plan.uri, path), problem
    return None


def raise_if_unreadable(
    plan: SourcePlan, paths: Iterable[str], run_id: str | None, cause: BaseException
) -> None:
    """After ``cause`` failed a read of ``paths``: raise ``InputError`` (from ``cause``) naming
    the first shard that does not decode (``find_unreadable_shard``) and the fix; return if
    none is, for the caller to re-raise ``cause``.

    Shards are only read when ``cause`` could come from bad data (an I/O, Arrow or text
    decoding error, possibly wrapped by Ray): after an out-of-memory error or a lost actor,
    reading a large input again on the driver would only delay the real message.
    """
    if not may_be_bad_data(cause):
        return
    bad = find_unreadable_shard(plan, paths)
    if bad is not None:
        raise InputError(
            f"Input file {bad[0]} {bad[1]}. Replace or remove the shard, then rerun with the "
            f"same --run-id {run_id}: finished shards are kept."
        ) from cause


def has_own_path_column(plan: SourcePlan) -> bool:
    """Whether the input itself has a ``path`` column (then Ray's source tracking is off)."""
    return "path" in plan.schema.names


def _list_files(uri: str, fs: pafs.FileSystem, base: str) -> list[str]:
    """Files under a directory/prefix, a single file, or a glob; hidden/_ files skipped."""
    try:
        if any(ch in base for ch in "*?["):
            root = base[: min(base.index(ch) for ch in "*?[" if ch in base)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, base)]
        else:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.File:
                files = [base]
            elif info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
                files = [i.path for i in infos if i.is_file]
            else:
                files = []
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"Cannot list input {uri}: {storage.describe_error(err)}.") from err
    files = sorted(f for f in files if not _hidden(f, base))
    if not files:
        raise InputError(
            f"No input files found at {uri}: check the path (a directory, s3:// prefix, file or "
            "glob such as s3://bucket/pairs/*.parquet), the bucket name and the endpoint."
        )
    return files


def _hidden(path: str, base: str) -> bool:
    rel = path[len(base) :] if path.startswith(base) else os.path.basename(path)
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _format_of(cfg: JobConfig, paths: list[str]) -> str:
    if cfg.input_format != "auto":
        return cfg.input_format
    kinds = set()
    for p in paths:
        low = p.lower()
        if low.endswith(JSONL_SUFFIXES):
            kinds.add("jsonl")
        elif low.endswith(PARQUET_SUFFIXES):
            kinds.add("parquet")
        else:
            raise InputError(
                f"Cannot tell the format of input file {p!r} from its name: pass "
                "--input-format parquet or --input-format jsonl."
            )
    if len(kinds) > 1:
        raise InputError(
            f"Input {cfg.input} mixes Parquet and JSONL files; point --input at one format."
        )
    return kinds.pop()

"""Read candidate-pair shards (Parquet or JSONL) into a Ray Dataset, checked up front.

Before anything is scored, every shard's schema is read (Parquet footers; JSONL is parsed
and its text checked) so a missing column, a clashing column name, a corrupt file or an
unreachable bucket fails the run at once with a message naming the object. The footers also
give the exact input row count that the sink checks the output against. A Parquet data page
is only decoded by the read itself; when a run fails, ``find_unreadable_shard`` tells whether
a shard that does not decode was the cause.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rerank_ray import schema, storage
from rerank_ray.config import JobConfig
from rerank_ray.errors import RerankError

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")
# Columns the job adds to every row (tokenize, then score); an input column of the same name
# that is passed through would appear twice in the output schema.
JOB_COLUMNS = (*schema.TOKEN_COLUMNS, *schema.OUTPUT_COLUMNS, schema.REJECT_REASON)


class InputError(RerankError, ValueError):
    """The input cannot be read as candidate pairs; the message names the object and the fix."""


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
    required = list(cfg.column_map)
    readers = {"parquet": _parquet_schema, "jsonl": _jsonl_schema}
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda p: readers[fmt](fs, p, cfg.input), paths))
    first_schema = None
    total = 0
    counts = []
    for path, (file_schema, rows) in zip(paths, infos, strict=True):
        shown = storage.display(cfg.input, path)
        missing = [c for c in required if c not in file_schema.names]
        if missing:
            raise InputError(
                f"Input file {shown} has no column {missing[0]!r} (columns: "
                f"{', '.join(file_schema.names)}). Map your column names with "
                f"--{_flag_for(cfg, missing[0])} NAME."
            )
        _check_no_clash(cfg, file_schema.names, shown, (*JOB_COLUMNS, *reserved_columns))
        if first_schema is None:
            first_schema, first_shown = file_schema, shown
        else:
            _check_same_types(first_schema, first_shown, file_schema, shown)
        total += rows
        counts.append(rows)
    partition_cols = [c for c in cfg.partition_by if c != schema.RUN_DATE]
    canonical = [cfg.column_map.get(n, n) for n in first_schema.names]
    for col in partition_cols:
        if col not in canonical:
            raise InputError(
                f"Partition column {col!r} (from --partition-by) is not an input column; "
                f"input columns are {', '.join(canonical)}. Use run_date or one of those."
            )
    if cfg.keep_columns is not None:
        for col in cfg.keep_columns:
            if col not in first_schema.names:
                raise InputError(
                    f"Column {col!r} in --keep-columns is not in the input (columns: "
                    f"{', '.join(first_schema.names)})."
                )
    return SourcePlan(
        uri=cfg.input,
        filesystem=fs,
        paths=tuple(paths),
        format=fmt,
        num_rows=total,
        schema=first_schema,
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
    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = pool.map(lambda p: _shard_problem(plan, p), paths)
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
    if not _may_be_bad_data(cause):
        return
    bad = find_unreadable_shard(plan, paths)
    if bad is not None:
        raise InputError(
            f"Input file {bad[0]} {bad[1]}. Replace or remove the shard, then rerun with the "
            f"same --run-id {run_id}: finished shards are kept."
        ) from cause


def _may_be_bad_data(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (OSError, pa.ArrowException, UnicodeError)):
            return True  # Ray's RayTaskError(OSError) is an OSError too
        seen.add(id(err))
        # RayTaskError keeps the task's exception in ``cause``; a UDF's error is chained.
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return False


class _BadContent(Exception):
    """A shard's bytes were fetched but do not decode; the message says what is wrong where."""


def _shard_problem(plan: SourcePlan, path: str) -> str | None:
    try:
        data = _read_bytes(plan.filesystem, path)
    except (OSError, pa.ArrowException):
        return None
    try:
        if plan.format == "parquet":
            _decode_parquet(data, list(plan.schema.names))
        else:
            _jsonl_table(_decompressed(path, data))
    except _BadContent as bad:
        return str(bad)
    return None


def _read_bytes(fs: pafs.FileSystem, path: str) -> pa.Buffer:
    """The file's bytes as stored; an error here is the storage's, not the file's."""
    with fs.open_input_stream(path, compression=None) as fh:
        return fh.read_buffer()


def _decompressed(path: str, data: pa.Buffer) -> pa.Buffer:
    """JSON lines decompressed by the file name's extension (.gz, .zst...) as Ray's reader
    does (``pa.Codec.detect``); Parquet compresses inside the file instead."""
    try:
        codec = pa.Codec.detect(path).name
    except (ValueError, TypeError):  # no compression extension
        return data
    try:
        return pa.CompressedInputStream(pa.BufferReader(data), codec).read_buffer()
    except (OSError, pa.ArrowException) as err:
        raise _BadContent(f"is not a readable {codec} file ({_describe(err)})") from err


def _decode_parquet(data: pa.Buffer, columns: list[str]) -> None:
    """Decode every page of ``columns``, checking the values (text must be UTF-8) as well."""
    try:
        for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(columns=columns):
            batch.validate(full=True)
    except (OSError, pa.ArrowException) as err:
        raise _BadContent(f"has data that does not decode ({_describe(err)})") from err


def _jsonl_table(data: pa.Buffer) -> pa.Table:
    """Parse JSON lines as Ray 2.60's JSON reader does, then check what it does not.

    The reader (``ArrowJSONDatasource``) parses the whole file with ``pyarrow.json``, doubling
    the block size while a line straddles two blocks, up to the DataContext's
    ``target_max_block_size``. ``pyarrow.json`` does not check that strings are UTF-8: bytes
    that are not pass into the Dataset and fail the first stage that reads the text (a
    ``UnicodeDecodeError`` inside a tokenize actor), so the full validation here finds them.
    """
    block_size = pajson.ReadOptions().block_size
    while True:
        try:
            table = pajson.read_json(
                pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=block_size)
            )
            break
        except pa.ArrowInvalid as err:
            if "straddles two block boundaries" in str(err):
                limit = _ray_max_block_size()
                if limit is None or block_size < limit:
                    block_size *= 2
                    continue
            raise _BadContent(
                f"is not readable JSON lines ({_describe(err)}). Each line must be one JSON object"
            ) from err
    try:
        table.validate(full=True)
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:  # a field name that is not UTF-8
        raise _BadContent(_utf8_problem(data) or f"holds invalid data ({_describe(err)})") from err
    return table


def _ray_max_block_size() -> int | None:
    # Only asked for a line over the 1 MiB first block: importing Ray Data takes seconds.
    from ray.data.context import DataContext

    return DataContext.get_current().target_max_block_size


def _utf8_problem(data: pa.Buffer) -> str | None:
    """Where ``data`` stops being UTF-8: its line number and the bad bytes; None if it is."""
    raw = data.to_pybytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - raw.rfind(b"\n", 0, err.start)  # 1-based; rfind is -1 on line 1
        return (
            f"has bytes that are not UTF-8 on line {line} ({raw[err.start : err.end]!r} at "
            f"byte {column} of the line). JSON text must be UTF-8: re-encode the file as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 if it was written as Latin-1), or fix or remove "
            f"line {line}"
        )
    return None


def _describe(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _check_no_clash(
    cfg: JobConfig, names: list[str], shown: str, reserved: Collection[str]
) -> None:
    """An input column passed through under a name the job also writes (``score``, or ``doc``
    when --doc-column renames another column to it) would appear twice in the output."""
    renamed = {canon: orig for orig, canon in cfg.column_map.items() if orig != canon}
    kept = [
        n for n in names if cfg.keep_columns is None or n in cfg.keep_columns or n in cfg.column_map
    ]
    clashes = [n for n in kept if n not in cfg.column_map and (n in renamed or n in reserved)]
    if not clashes:
        return
    name = clashes[0]
    if name in renamed:
        why = f"--{_flag_for(cfg, renamed[name])} {renamed[name]} is renamed to {name!r}"
    else:
        why = "the job writes a column of that name"
    others = [n for n in kept if n not in clashes]
    raise InputError(
        f"Input file {shown} has a column {name!r}, but {why}, so the output would hold it "
        f"twice. Pass --keep-columns without it (e.g. --keep-columns {','.join(others)}), or "
        "rename the column in the input."
    )


def _type_kind(t: pa.DataType) -> object:
    """Types that Ray Data combines across shards count as one kind: string widths (seen
    with Parquet), and numbers (int64 and double JSONL shards were combined in a test run).
    Anything else must match exactly."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    return t


def _check_same_types(first: pa.Schema, first_shown: str, other: pa.Schema, shown: str) -> None:
    """A column typed differently in two shards makes Ray Data fail mid-run, after the model
    has loaded, with an Arrow "Unable to merge" error; say which file and column up front."""
    for field in other:
        if field.name not in first.names:
            continue
        want = first.field(field.name).type
        if pa.types.is_null(want) or pa.types.is_null(field.type):
            continue  # an all-null column (JSONL) takes the other shards' type
        if _type_kind(want) != _type_kind(field.type):
            raise InputError(
                f"Column {field.name!r} is {field.type} in input file {shown} but {want} in "
                f"{first_shown}. Every shard needs the same column types: rewrite {shown} with "
                f"{field.name!r} as {want} (or all shards with one type)."
            )


def has_own_path_column(plan: SourcePlan) -> bool:
    """Whether the input itself has a ``path`` column (then Ray's source tracking is off)."""
    return "path" in plan.schema.names


def _flag_for(cfg: JobConfig, column: str) -> str:
    for key in ("query_id_column", "query_column", "doc_id_column", "doc_column"):
        if getattr(cfg, key) == column:
            return key.replace("_", "-")
    return "keep-columns"


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


def _parquet_schema(fs: pafs.FileSystem, path: str, uri: str) -> tuple[pa.Schema, int]:
    shown = storage.display(uri, path)
    try:
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
            return meta.schema.to_arrow_schema(), meta.num_rows
    except (OSError, pa.ArrowException) as err:
        raise InputError(
            f"Input file {shown} is not a readable Parquet file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Replace or remove it, or pass "
            "--input-format jsonl if it is JSON lines."
        ) from err


def _jsonl_schema(fs: pafs.FileSystem, path: str, uri: str) -> tuple[pa.Schema, int]:
    shown = storage.display(uri, path)
    try:
        data = _read_bytes(fs, path)
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"Cannot read input file {shown}: {storage.describe_error(err)}.") from err
    try:
        table = _jsonl_table(_decompressed(path, data))
    except _BadContent as bad:
        raise InputError(f"Input file {shown} {bad}.") from bad
    return table.schema, table.num_rows

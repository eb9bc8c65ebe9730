"""What makes an input shard unusable, found before (or, for a failed read, after) the run,
said in an ``InputError`` (or, by ``shard_problem``, a phrase) naming the shard and the fix.

- Columns (``check_columns``): the ones the job needs are there, none clashes with a column
  the job writes, partition and kept columns exist, and every shard types a column alike.
- Schema and rows (``read_shard_schema``): a Parquet footer, or JSON lines parsed and their
  text checked to be UTF-8.
- Data (``shard_problem``): a shard read whole and decoded, to name the shard behind a read
  error that names none (the footers say nothing of the data pages).
"""

from __future__ import annotations

from collections.abc import Collection

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from rerank_ray import schema, storage
from rerank_ray.config import JobConfig
from rerank_ray.errors import RerankError

# Columns the job adds to every row (tokenize, then score); an input column of the same name
# that is passed through would appear twice in the output schema.
JOB_COLUMNS = (*schema.TOKEN_COLUMNS, *schema.OUTPUT_COLUMNS, schema.REJECT_REASON)


class InputError(RerankError, ValueError):
    """The input cannot be read as candidate pairs; the message names the object and the fix."""


def check_columns(
    cfg: JobConfig, shards: list[tuple[str, pa.Schema]], reserved_columns: Collection[str] = ()
) -> None:
    """Check the columns of every shard, given as (name as shown to the user, schema);
    ``reserved_columns`` as in ``source.plan_source``."""
    first_shown, first_schema = shards[0]
    for shown, file_schema in shards:
        missing = [c for c in cfg.column_map if c not in file_schema.names]
        if missing:
            raise InputError(
                f"Input file {shown} has no column {missing[0]!r} (columns: "
                f"{', '.join(file_schema.names)}). Map your column names with "
                f"--{_flag_for(cfg, missing[0])} NAME."
            )
        _check_no_clash(cfg, file_schema.names, shown, (*JOB_COLUMNS, *reserved_columns))
        _check_same_types(first_schema, first_shown, file_schema, shown)
    canonical = [cfg.column_map.get(n, n) for n in first_schema.names]
    for col in cfg.partition_by:
        if col != schema.RUN_DATE and col not in canonical:
            raise InputError(
                f"Partition column {col!r} (from --partition-by) is not an input column; "
                f"input columns are {', '.join(canonical)}. Use run_date or one of those."
            )
    for col in cfg.keep_columns or ():
        if col not in first_schema.names:
            raise InputError(
                f"Column {col!r} in --keep-columns is not in the input (columns: "
                f"{', '.join(first_schema.names)})."
            )


def read_shard_schema(fs: pafs.FileSystem, path: str, uri: str, fmt: str) -> tuple[pa.Schema, int]:
    """(schema, row count) of one shard of input ``uri``: the Parquet footer, or the JSON
    lines parsed and checked."""
    reader = _parquet_schema if fmt == "parquet" else _jsonl_schema
    return reader(fs, path, uri)


def may_be_bad_data(err: BaseException | None) -> bool:
    """Whether ``err`` (or what it wraps) could come from bad data: an I/O, Arrow or text
    decoding error, not an out-of-memory error or a lost actor."""
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


def shard_problem(fs: pafs.FileSystem, path: str, fmt: str, columns: list[str]) -> str | None:
    """What is wrong with the data of shard ``path`` (``columns`` of it, when Parquet), read
    whole and decoded; None when it decodes, or when it cannot be fetched (not the file's
    fault: the run's own error describes a storage outage)."""
    try:
        data = _read_bytes(fs, path)
    except (OSError, pa.ArrowException):
        return None
    try:
        if fmt == "parquet":
            _decode_parquet(data, columns)
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


def _flag_for(cfg: JobConfig, column: str) -> str:
    for key in ("query_id_column", "query_column", "doc_id_column", "doc_column"):
        if getattr(cfg, key) == column:
            return key.replace("_", "-")
    return "keep-columns"


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

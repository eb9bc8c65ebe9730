"""What a block of whole queries becomes in a mode's per-query step (``stage.py``): pure, no Ray.

The job's sink checks that every row read comes out exactly once, scored or rejected. The
modes keep that invariant: a row a mode leaves out is not dropped but marked, with a
``reject_reason`` of its own, so the sink counts it (``rejects_by_reason`` in the manifest)
and writes it under ``_rejects/``. Rows rejected before the mode pass through unchanged.

- ``duplicate_pair``: a further copy of a (query_id, doc_id) already kept (both modes).
- ``below_top_k``: a candidate ranked below the nightly ``top_k`` (its ``rank`` is kept).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.labeling import MODE_FIELDS, check_label_columns, label_ranked
from rerank_ray.modes.ranking import (
    RANK,
    RANK_FIELDS,
    rank_scored,
    resolve_first_stage,
    split_rejected,
    with_null_columns,
)

DUPLICATE_PAIR = schema.RejectReason.DUPLICATE_PAIR
BELOW_TOP_K = schema.RejectReason.BELOW_TOP_K


def nightly_group(table: pa.Table, cfg: NightlyConfig) -> pa.Table:
    """Ranked top-k rows, then below-top-k and duplicate rows marked, then rejected rows;
    as many rows as came in."""
    table = _with_reason_column(table)
    scored, rejected = split_rejected(table)
    fs_column = resolve_first_stage(table.column_names, cfg.first_stage)
    ranked, duplicates = rank_scored(scored, fs_column)
    keep = _rank_at_most(ranked, cfg.top_k)
    parts = [
        ranked.filter(keep),
        _mark(ranked.filter(pc.invert(keep)), BELOW_TOP_K),
        _mark(with_null_columns(duplicates, RANK_FIELDS), DUPLICATE_PAIR),
        with_null_columns(rejected, RANK_FIELDS),
    ]
    return _concat_checked(parts, table.num_rows)


def labeling_group(table: pa.Table, cfg: LabelConfig) -> pa.Table:
    """Labeled rows, then duplicate rows marked, then rejected rows; as many rows as came in."""
    table = _with_reason_column(table)
    check_label_columns(table.column_names, cfg)
    scored, rejected = split_rejected(table)
    fs_column = resolve_first_stage(table.column_names, cfg.first_stage)
    ranked, duplicates = rank_scored(scored, fs_column)
    parts = [
        label_ranked(ranked, cfg),
        _mark(with_null_columns(duplicates, MODE_FIELDS), DUPLICATE_PAIR),
        with_null_columns(rejected, MODE_FIELDS),
    ]
    return _concat_checked(parts, table.num_rows)


def _rank_at_most(ranked: pa.Table, k: int | None) -> pa.ChunkedArray:
    if k is None:
        return pa.chunked_array([pa.array([True] * ranked.num_rows, pa.bool_())])
    return pc.less_equal(ranked[RANK], k)


def _with_reason_column(table: pa.Table) -> pa.Table:
    """``reject_reason`` as a string column (added all-null when the input has none)."""
    if schema.REJECT_REASON not in table.column_names:
        return table.append_column(
            pa.field(schema.REJECT_REASON, pa.string()), pa.nulls(table.num_rows, pa.string())
        )
    index = table.schema.get_field_index(schema.REJECT_REASON)
    return table.set_column(
        index, schema.REJECT_REASON, table[schema.REJECT_REASON].cast(pa.string())
    )


def _mark(table: pa.Table, reason: str) -> pa.Table:
    index = table.schema.get_field_index(schema.REJECT_REASON)
    return table.set_column(
        index, schema.REJECT_REASON, pa.array([reason] * table.num_rows, pa.string())
    )


def _concat_checked(parts: list[pa.Table], rows_in: int) -> pa.Table:
    out = pa.concat_tables(parts)
    if out.num_rows != rows_in:
        raise RuntimeError(
            f"A query group of {rows_in} rows came out as {out.num_rows}; the mode must emit "
            "every row exactly once (a bug in rerank_ray.modes)."
        )
    return out

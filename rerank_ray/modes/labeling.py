"""Per-query labels for training data: positives, negatives and mined hard negatives.

Pure functions on pyarrow Tables, no Ray; a table holds whole queries (see ``ranking.py``).

- ``label``: ``"pos"``, ``"neg"`` or null (unlabeled). With ``label_source: threshold``,
  pos when ``score_column >= pos_threshold``, neg when ``<= neg_threshold`` (NaN: unlabeled).
  With ``label_source: given``, from the input's ``is_positive`` (true / false / null).
- ``hard_negative``: a neg whose rank lies in the window
  ``[hard_negative_min_rank, hard_negative_max_rank]`` and whose ``score_column`` passes the
  margin filters of sentence-transformers' ``mine_hard_negatives``, against the query's
  lowest-scoring positive ``p``: ``value <= p - margin`` (its ``absolute_margin``),
  ``value <= p * (1 - relative_margin)`` and ``value <= max_score`` when those are set; at
  most ``max_hard_negatives`` per query, best-ranked first. A query without positives has
  none (no reference score).
- Rejected rows pass through unchanged with null mode columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema
from rerank_ray.modes.config import LabelConfig
from rerank_ray.modes.ranking import (
    NUM_CANDIDATES,
    NUM_DUPLICATES,
    RANK,
    RANK_FIELDS,
    Sums,
    query_groups,
    split_rejected,
)
from rerank_ray.typed_config import ConfigError

IS_POSITIVE = "is_positive"
LABEL = "label"
HARD_NEGATIVE = "hard_negative"
POS = "pos"
NEG = "neg"
LABEL_FIELDS = (pa.field(LABEL, pa.string()), pa.field(HARD_NEGATIVE, pa.bool_()))
MODE_FIELDS = (*RANK_FIELDS, *LABEL_FIELDS)


def check_label_columns(names: list[str], cfg: LabelConfig) -> None:
    """Raise, naming the fix, when the columns the labels need are missing."""
    if cfg.label_source == "given" and IS_POSITIVE not in names:
        raise ConfigError(
            f"label_source is 'given' but the input has no `{IS_POSITIVE}` column (columns: "
            f"{', '.join(names)}); add it or use label_source: threshold."
        )
    for name in (cfg.score_column, cfg.teacher_score):
        if name not in names:
            raise ConfigError(f"Labeling needs the `{name}` column; the input lacks it.")


def label_ranked(ranked: pa.Table, cfg: LabelConfig) -> pa.Table:
    """Append ``label`` and ``hard_negative`` to ``rank_scored`` output (sorted by query, rank)."""
    value = _as_float(ranked[cfg.score_column])
    if cfg.label_source == "threshold":
        # Compare in the column's own precision, so a float32 0.7 counts as ">= 0.7".
        native = ranked[cfg.score_column].to_numpy()
        pos = native >= native.dtype.type(cfg.pos_threshold)  # NaN: False both ways
        neg = native <= native.dtype.type(cfg.neg_threshold)
    else:
        given = _as_bool(ranked[IS_POSITIVE])
        pos = pc.fill_null(given, False).to_numpy(zero_copy_only=False)
        neg = pc.fill_null(pc.invert(given), False).to_numpy(zero_copy_only=False)
    labels = np.where(pos, POS, np.where(neg, NEG, None))
    hard = _hard_negatives(ranked, value, pos, neg, cfg)
    ranked = ranked.append_column(LABEL_FIELDS[0], pa.array(labels, pa.string()))
    return ranked.append_column(LABEL_FIELDS[1], pa.array(hard, pa.bool_()))


def _hard_negatives(
    ranked: pa.Table, value: np.ndarray, pos: np.ndarray, neg: np.ndarray, cfg: LabelConfig
) -> np.ndarray:
    """Hard-negative mask over rows sorted by (query_id, rank)."""
    if ranked.num_rows == 0:
        return np.zeros(0, dtype=bool)
    starts, group_of_row = query_groups(ranked[schema.QUERY_ID])
    lowest_pos = np.minimum.reduceat(np.where(pos, value, np.inf), starts)[group_of_row]
    rank = ranked[RANK].to_numpy()
    candidate = (
        neg
        & (rank >= cfg.hard_negative_min_rank)
        & (rank <= cfg.hard_negative_max_rank)
        & np.isfinite(lowest_pos)
        & (value <= lowest_pos - cfg.margin)
    )
    if cfg.relative_margin is not None:
        candidate &= value <= lowest_pos * (1 - cfg.relative_margin)
    if cfg.max_score is not None:
        candidate &= value <= cfg.max_score
    # Rows are in rank order within a query: count candidates so far and keep the first N.
    running = np.cumsum(candidate)
    before_group = (running - candidate)[starts][group_of_row]
    return candidate & (running - before_group <= cfg.max_hard_negatives)


@dataclass(frozen=True)
class LabelStats(Sums):
    """Partial sums over whole queries of labeled rows; add them up with ``+``."""

    queries: int = 0
    rows: int = 0
    positives: int = 0
    negatives: int = 0
    unlabeled: int = 0
    hard_negatives: int = 0
    queries_no_positive: int = 0
    queries_no_negative: int = 0
    queries_no_hard_negative: int = 0
    exportable_queries: int = 0
    single_candidate_queries: int = 0
    duplicates_dropped: int = 0
    rejected_rows: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def label_stats(labeled: pa.Table) -> LabelStats:
    """Counts of ``labeling_group`` output. ``queries_no_hard_negative`` counts queries with a
    positive but no hard negative; ``exportable_queries`` those with both (the JSONL rows)."""
    scored, rejected = split_rejected(labeled)
    if scored.num_rows == 0:
        return LabelStats(rejected_rows=rejected.num_rows)
    label = scored[LABEL]
    per_query = (
        pa.table(
            {
                "q": scored[schema.QUERY_ID],
                "n": scored[NUM_CANDIDATES],
                "d": scored[NUM_DUPLICATES],
                "pos": pc.cast(pc.fill_null(pc.equal(label, POS), False), pa.int64()),
                "neg": pc.cast(pc.fill_null(pc.equal(label, NEG), False), pa.int64()),
                "hard": pc.cast(scored[HARD_NEGATIVE], pa.int64()),
            }
        )
        .group_by("q")
        .aggregate([("n", "max"), ("d", "max"), ("pos", "sum"), ("neg", "sum"), ("hard", "sum")])
    )
    n_pos = per_query["pos_sum"].to_numpy()
    n_neg = per_query["neg_sum"].to_numpy()
    n_hard = per_query["hard_sum"].to_numpy()
    return LabelStats(
        queries=per_query.num_rows,
        rows=scored.num_rows,
        positives=int(n_pos.sum()),
        negatives=int(n_neg.sum()),
        unlabeled=label.null_count,
        hard_negatives=int(n_hard.sum()),
        queries_no_positive=int((n_pos == 0).sum()),
        queries_no_negative=int((n_neg == 0).sum()),
        queries_no_hard_negative=int(((n_pos > 0) & (n_hard == 0)).sum()),
        exportable_queries=int(((n_pos > 0) & (n_hard > 0)).sum()),
        single_candidate_queries=int((per_query["n_max"].to_numpy() == 1).sum()),
        duplicates_dropped=int(per_query["d_max"].to_numpy().sum()),
        rejected_rows=rejected.num_rows,
    )


def _as_float(column: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _as_bool(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``is_positive`` as booleans: bool columns as they are, integers 0/1."""
    if pa.types.is_boolean(column.type):
        return column
    if pa.types.is_integer(column.type):
        outside = pc.invert(pc.is_in(column, pa.array([0, 1], column.type)))
        bad = pc.and_(pc.is_valid(column), outside)
        if pc.any(bad).as_py():
            raise ValueError(f"`{IS_POSITIVE}` holds integers other than 0/1; use booleans.")
        return pc.cast(column, pa.bool_())
    raise ValueError(
        f"`{IS_POSITIVE}` has type {column.type}; it must be boolean (or integer 0/1)."
    )

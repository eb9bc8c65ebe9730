"""Per-query ranking: de-duplicate, rank, keep the top K, compare with the first-stage order.

Pure functions on pyarrow Tables, no Ray. A table holds any number of *whole* queries: one
``groupby("query_id").map_groups`` group, or everything read back from a run. Rows whose
``reject_reason`` is set pass through unchanged (the added columns are null on them); they
are never ranked, counted as candidates or de-duplicated.

Definitions (the contract the tests check):

- ``rank``: 1 = highest ``score``; equal scores are ordered by ``doc_id`` ascending; NaN
  scores rank last. A query with a single candidate has it at rank 1.
- Duplicates: scored rows sharing ``(query_id, doc_id)`` are kept once — the copy with the
  highest score (then the best first-stage position, then the smallest ``doc`` text) — and
  counted in ``num_duplicates``.
- ``first_stage_rank``: the candidate's position in the first-stage order among the same
  de-duplicated candidates: ``retrieval_rank`` ascending or ``retrieval_score`` descending,
  ties by ``doc_id``, missing values last. Null when there is no first-stage column.
- ``num_candidates`` / ``num_duplicates``: per query, repeated on each of its rows, so the
  statistics can be recomputed from any subset of rows that keeps ranks 1..K (the top-K output).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema

RANK = "rank"
FIRST_STAGE_RANK = "first_stage_rank"
NUM_CANDIDATES = "num_candidates"
NUM_DUPLICATES = "num_duplicates"
RANK_COLUMNS = (RANK, FIRST_STAGE_RANK, NUM_CANDIDATES, NUM_DUPLICATES)
RANK_FIELDS = tuple(pa.field(name, pa.int32()) for name in RANK_COLUMNS)

RETRIEVAL_RANK = "retrieval_rank"
RETRIEVAL_SCORE = "retrieval_score"

_KEY = "__key"
_S = TypeVar("_S", bound="Sums")


def split_rejected(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(scored rows, rejected rows); without a ``reject_reason`` column every row is scored."""
    if schema.REJECT_REASON not in table.column_names:
        return table, table.slice(0, 0)
    rejected = pc.is_valid(table[schema.REJECT_REASON])
    return table.filter(pc.invert(rejected)), table.filter(rejected)


def resolve_first_stage(names: list[str], choice: str) -> str | None:
    """The first-stage column to compare against (``choice`` from the config), or None."""
    if choice == "none":
        return None
    if choice == "auto":
        for name in (RETRIEVAL_RANK, RETRIEVAL_SCORE):
            if name in names:
                return name
        return None
    if choice not in names:
        raise ValueError(
            f"first_stage is {choice!r} but the input has no `{choice}` column (columns: "
            f"{', '.join(names)}); use first_stage auto or none."
        )
    return choice


def with_null_columns(table: pa.Table, new_fields: tuple[pa.Field, ...]) -> pa.Table:
    """``table`` with all-null columns appended (the mode columns of rejected rows)."""
    for f in new_fields:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


class Ranked(NamedTuple):
    """``rank_scored``'s result: the ranked candidates, and the duplicate copies dropped."""

    ranked: pa.Table
    duplicates: pa.Table


def rank_scored(scored: pa.Table, first_stage_column: str | None) -> Ranked:
    """Rank scored rows (no rejected ones); see the module docstring for the definitions.

    ``ranked`` is sorted by (query_id, rank) with ``RANK_COLUMNS`` appended; ``duplicates``
    holds the dropped copies with their columns as they came in."""
    clash = [name for name in RANK_COLUMNS if name in scored.column_names]
    if clash:
        raise ValueError(
            f"The input already has column(s) {clash}, which the ranking adds; rename or drop "
            "them (e.g. with keep_columns) before running a mode."
        )
    for name in (schema.QUERY_ID, schema.DOC_ID, schema.SCORE):
        if name not in scored.column_names:
            raise ValueError(f"Ranking needs the `{name}` column; the input has {scored.schema}.")
    if scored.num_rows and (scored[schema.QUERY_ID].null_count or scored[schema.DOC_ID].null_count):
        raise ValueError("Scored rows with a null query_id or doc_id: they must be rejected rows.")

    desc_score = -_finite_or(scored[schema.SCORE], -np.inf)  # NaN/null -> +inf: ranks last
    fs_key = _first_stage_key(scored, first_stage_column)
    doc_key = (
        scored[schema.DOC]
        if schema.DOC in scored.column_names
        else pa.nulls(scored.num_rows, pa.string())
    )

    # 1. De-duplicate (query_id, doc_id): the best copy first in each run, then keep run heads.
    order = _sort([scored[schema.QUERY_ID], scored[schema.DOC_ID], desc_score, fs_key, doc_key])
    qid = scored[schema.QUERY_ID].take(order)
    did = scored[schema.DOC_ID].take(order)
    head = _run_heads(qid) | _run_heads(did)
    kept_rows = order[head]
    dup_per_kept = np.diff(np.append(np.flatnonzero(head), len(order))) - 1

    # 2. Rank the kept rows: query_id, then score descending, then doc_id.
    kept = scored.take(kept_rows)
    rank_order = _sort([kept[schema.QUERY_ID], desc_score[kept_rows], kept[schema.DOC_ID]])
    ranked = kept.take(rank_order)
    starts, group_of_row = query_groups(ranked[schema.QUERY_ID])
    positions = np.arange(ranked.num_rows)
    rank = positions - starts[group_of_row] + 1
    sizes = np.diff(np.append(starts, ranked.num_rows))
    dups = np.add.reduceat(dup_per_kept[rank_order], starts) if len(starts) else sizes

    # 3. First-stage position of the same candidates.
    first_stage = pa.nulls(ranked.num_rows, pa.int32())
    if first_stage_column is not None:
        fs_ranked = fs_key[kept_rows][rank_order]
        fs_order = _sort([ranked[schema.QUERY_ID], fs_ranked, ranked[schema.DOC_ID]])
        fs_rank = np.empty(ranked.num_rows, dtype=np.int64)
        fs_rank[fs_order] = rank  # fs_order keeps query groups in place: positions map 1:1
        first_stage = pa.array(fs_rank, pa.int32())

    columns = {
        RANK: pa.array(rank, pa.int32()),
        FIRST_STAGE_RANK: first_stage,
        NUM_CANDIDATES: pa.array(sizes[group_of_row], pa.int32()),
        NUM_DUPLICATES: pa.array(dups[group_of_row], pa.int32()),
    }
    for f in RANK_FIELDS:
        ranked = ranked.append_column(f, columns[f.name])
    return Ranked(ranked, scored.take(order[~head]))


class Sums:
    """Base of a frozen dataclass of partial sums over whole queries: ``+`` adds two field by
    field (the blocks' partials, on the driver). The fields in ``PARAMETERS`` are not sums:
    they must be equal and are kept."""

    PARAMETERS: ClassVar[tuple[str, ...]] = ()

    def __add__(self: _S, other: _S) -> _S:
        for name in self.PARAMETERS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(
                    f"Cannot add {type(self).__name__} for {name}={mine} and {name}={theirs}."
                )
        sums = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.PARAMETERS
        }
        return dataclasses.replace(self, **sums)


@dataclass(frozen=True)
class NightlyStats(Sums):
    """Partial sums over whole queries; add them up across groups with ``+``."""

    PARAMETERS = ("k",)

    k: int
    queries: int = 0
    candidates: int = 0
    duplicates_dropped: int = 0
    single_candidate_queries: int = 0
    rows_kept: int = 0
    rejected_rows: int = 0
    compared_queries: int = 0
    overlap_at_k_sum: float = 0.0
    top1_changed: int = 0

    def to_dict(self) -> dict[str, float | int | None]:
        """The sums plus the means a reader wants (None when no query could be compared)."""
        out: dict[str, float | int | None] = dataclasses.asdict(self)
        n = self.compared_queries
        out[f"mean_overlap_at_{self.k}"] = self.overlap_at_k_sum / n if n else None
        out["top1_changed_share"] = self.top1_changed / n if n else None
        return out


def nightly_stats(ranked: pa.Table, k: int) -> NightlyStats:
    """Statistics of ranked rows (``nightly_group`` output with any ``top_k >= k``, or none).

    The first-stage comparison covers queries with at least two candidates and a first-stage
    column: overlap@k = |reranked top-k ∩ first-stage top-k| / min(k, candidates), and whether
    the rank-1 candidate was not first-stage rank 1.
    """
    scored, rejected = split_rejected(ranked)
    if scored.num_rows == 0:
        return NightlyStats(k=k, rejected_rows=rejected.num_rows)
    rank = scored[RANK].to_numpy()
    fs = scored[FIRST_STAGE_RANK]
    has_fs = fs.null_count == 0
    fs_np = fs.to_numpy(zero_copy_only=False) if has_fs else np.zeros_like(rank)
    per_query = (
        pa.table(
            {
                "q": scored[schema.QUERY_ID],
                "n": scored[NUM_CANDIDATES],
                "d": scored[NUM_DUPLICATES],
                "hit": pa.array(((rank <= k) & (fs_np <= k)).astype(np.int64)),
                "top1_changed": pa.array(((rank == 1) & (fs_np != 1)).astype(np.int64)),
            }
        )
        .group_by("q")
        .aggregate([("n", "max"), ("d", "max"), ("hit", "sum"), ("top1_changed", "sum")])
    )
    n = per_query["n_max"].to_numpy().astype(np.int64)
    compared = n >= 2 if has_fs else np.zeros(len(n), dtype=bool)
    overlap = per_query["hit_sum"].to_numpy() / np.minimum(k, n)
    return NightlyStats(
        k=k,
        queries=len(n),
        candidates=int(n.sum()),
        duplicates_dropped=int(per_query["d_max"].to_numpy().sum()),
        single_candidate_queries=int((n == 1).sum()),
        rows_kept=scored.num_rows,
        rejected_rows=rejected.num_rows,
        compared_queries=int(compared.sum()),
        overlap_at_k_sum=float(overlap[compared].sum()),
        top1_changed=int(per_query["top1_changed_sum"].to_numpy()[compared].sum()),
    )


# --- helpers ----------------------------------------------------------------------------------
def _finite_or(column: pa.ChunkedArray | pa.Array, fill: float) -> np.ndarray:
    """Column as float64 with NaN and nulls replaced by ``fill``."""
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    return np.where(np.isnan(values), fill, values)


def _first_stage_key(table: pa.Table, column: str | None) -> np.ndarray:
    """Ascending sort key of the first-stage order (missing values last)."""
    if column is None:
        return np.zeros(table.num_rows)
    if column == RETRIEVAL_SCORE:
        return -_finite_or(table[column], -np.inf)
    return _finite_or(table[column], np.inf)


def _sort(keys: list) -> np.ndarray:
    """Indices sorting ascending by the keys in order (stable, nulls last)."""
    data = {f"{_KEY}{i}": key for i, key in enumerate(keys)}
    sort_keys = [(name, "ascending", "at_end") for name in data]
    indices = pc.sort_indices(pa.table(data), sort_keys=sort_keys)
    return indices.to_numpy()


def _run_heads(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """True where a value differs from the previous one (the first row of each run)."""
    n = len(values)
    heads = np.ones(n, dtype=bool)
    if n > 1:
        same = pc.equal(values.slice(1), values.slice(0, n - 1))
        heads[1:] = ~pc.fill_null(same, False).to_numpy(zero_copy_only=False)
    return heads


def query_groups(sorted_ids: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(start index of each group, group number of each row) for ids sorted into runs."""
    heads = _run_heads(sorted_ids)
    return np.flatnonzero(heads), np.cumsum(heads) - 1

"""Nightly-mode ranking: rank, de-duplication, top-k and first-stage statistics (no Ray).

Expectations come from a plain-Python reading of the contract in ``rerank_ray/modes/ranking.py``
and from pandas, never from the code under test.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from rerank_ray.modes.config import NightlyConfig
from rerank_ray.modes.groups import BELOW_TOP_K, DUPLICATE_PAIR, nightly_group
from rerank_ray.modes.ranking import (
    FIRST_STAGE_RANK,
    NUM_CANDIDATES,
    NUM_DUPLICATES,
    RANK,
    RANK_COLUMNS,
    NightlyStats,
    nightly_stats,
)

PAIR_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("doc_id", pa.string()),
        ("doc", pa.string()),
        ("retrieval_rank", pa.int64()),
        ("retrieval_score", pa.float64()),
        ("score", pa.float32()),
        ("score_norm", pa.float32()),
        ("truncated", pa.bool_()),
        ("reject_reason", pa.string()),
    ]
)


def make_rows(seed: int, queries: int = 30) -> list[dict]:
    """Random scored pairs with ties, NaN, duplicates, single-candidate queries and rejects."""
    rng = random.Random(seed)
    rows = []
    for q in range(queries):
        n = rng.choice([1, 1, 2, 3, 5, 8, 12])
        order = list(range(1, n + 1))
        rng.shuffle(order)
        for i in range(n):
            doc_id = f"d{rng.randrange(n + 2)}"  # small pool: duplicates happen
            score = rng.choice([round(rng.uniform(-4, 4), 1), 0.5, float("nan")])
            rejected = rng.random() < 0.1
            rows.append(
                {
                    "query_id": f"q{q:03d}",
                    "query": f"query {q}",
                    "doc_id": doc_id,
                    "doc": f"text of {doc_id} v{rng.randrange(3)}",
                    "retrieval_rank": order[i],
                    "retrieval_score": round(rng.uniform(0, 1), 2),
                    "score": None if rejected else score,
                    "score_norm": None if rejected else 1 / (1 + math.exp(-score)),
                    "truncated": None if rejected else False,
                    "reject_reason": "empty_doc" if rejected else None,
                }
            )
    rows.append({**rows[0], "query_id": None, "score": None, "reject_reason": "null_id"})
    return rows


def table_of(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def without_marked(rows: pa.Table) -> pa.Table:
    """A mode's rows less those it marks (duplicate copies, below top-k): the ranked rows, then
    the rows rejected before the mode, unchanged."""
    marked = pc.is_in(rows["reject_reason"], pa.array([DUPLICATE_PAIR, BELOW_TOP_K]))
    return rows.filter(pc.invert(marked))


def nightly_rows(table: pa.Table, first_stage: str = "auto", k: int | None = None) -> pa.Table:
    """What the nightly mode keeps of ``table`` (production ``nightly_group``): each query's
    de-duplicated candidates ranked (the best ``k``; all when None), then the rejected rows."""
    return without_marked(nightly_group(table, NightlyConfig(top_k=k, first_stage=first_stage)))


def _score_key(row: dict) -> float:
    s = row["score"]
    return -math.inf if s is None or math.isnan(s) else s


def reference_ranking(rows: list[dict], first_stage: str | None) -> dict[tuple, dict]:
    """(query_id, doc_id) -> expected mode columns, read straight off the contract."""

    def fs_key(row):
        if first_stage == "retrieval_rank":
            return row["retrieval_rank"]
        if first_stage == "retrieval_score":
            return -row["retrieval_score"]
        return 0

    by_query = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["reject_reason"] is None:
            by_query[row["query_id"]][row["doc_id"]].append(row)
    expected = {}
    for qid, docs in by_query.items():
        kept = [
            min(copies, key=lambda r: (-_score_key(r), fs_key(r), r["doc"]))
            for copies in docs.values()
        ]
        dups = sum(len(copies) - 1 for copies in docs.values())
        by_score = sorted(kept, key=lambda r: (-_score_key(r), r["doc_id"]))
        by_first = sorted(kept, key=lambda r: (fs_key(r), r["doc_id"]))
        for position, row in enumerate(by_score, start=1):
            expected[(qid, row["doc_id"])] = {
                **row,
                RANK: position,
                FIRST_STAGE_RANK: by_first.index(row) + 1 if first_stage else None,
                NUM_CANDIDATES: len(kept),
                NUM_DUPLICATES: dups,
            }
    return expected


def _same(a, b) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b or (isinstance(b, float) and a == pytest.approx(b, rel=1e-6))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("first_stage", ["retrieval_rank", "retrieval_score", "none"])
def test_rank_matches_the_contract(seed, first_stage):
    rows = make_rows(seed)
    out = nightly_rows(table_of(rows), first_stage=first_stage).to_pylist()
    expected = reference_ranking(rows, None if first_stage == "none" else first_stage)

    scored = [r for r in out if r["reject_reason"] is None]
    assert len(scored) == len(expected)
    for row in scored:
        want = expected[(row["query_id"], row["doc_id"])]
        for name, value in want.items():
            assert _same(row[name], value), (name, row, want)
    # Scored rows come sorted by (query_id, rank).
    keys = [(r["query_id"], r[RANK]) for r in scored]
    assert keys == sorted(keys)


def test_rejected_rows_pass_through_unchanged_and_unranked():
    rows = table_of(make_rows(5)).to_pylist()  # values as Arrow holds them (float32)
    out = nightly_rows(table_of(rows))
    rejected_in = [r for r in rows if r["reject_reason"] is not None]
    rejected_out = [r for r in out.to_pylist() if r["reject_reason"] is not None]
    assert len(rejected_out) == len(rejected_in) > 1
    for got, want in zip(rejected_out, rejected_in, strict=True):
        assert {k: got[k] for k in want} == want
        assert all(got[c] is None for c in RANK_COLUMNS)
    assert out.schema.field(RANK).type == pa.int32()


def test_ties_are_broken_by_doc_id_and_nan_ranks_last():
    rows = [
        {"query_id": "q", "query": "q", "doc_id": d, "doc": d, "score": s}
        for d, s in [("c", 1.0), ("a", 1.0), ("b", float("nan")), ("d", 2.0), ("e", -9.0)]
    ]
    out = nightly_rows(pa.Table.from_pylist(rows)).to_pylist()
    assert [(r["doc_id"], r[RANK]) for r in out] == [
        ("d", 1),
        ("a", 2),
        ("c", 3),
        ("e", 4),
        ("b", 5),
    ]


def test_duplicates_are_kept_once_the_best_copy_and_counted():
    rows = [
        {"query_id": "q", "query": "q", "doc_id": "x", "doc": "old", "score": 0.1},
        {"query_id": "q", "query": "q", "doc_id": "x", "doc": "new", "score": 0.9},
        {"query_id": "q", "query": "q", "doc_id": "x", "doc": "new", "score": 0.9},
        {"query_id": "q", "query": "q", "doc_id": "y", "doc": "y", "score": 0.5},
    ]
    out = nightly_rows(pa.Table.from_pylist(rows)).to_pylist()
    assert [(r["doc_id"], r["doc"], r[RANK], r[NUM_DUPLICATES]) for r in out] == [
        ("x", "new", 1, 2),
        ("y", "y", 2, 2),
    ]


def test_single_candidate_query_is_rank_one_and_counted():
    rows = [{"query_id": "solo", "query": "q", "doc_id": "x", "doc": "x", "score": -3.0}]
    out = nightly_rows(pa.Table.from_pylist(rows))
    assert out.select([RANK, NUM_CANDIDATES]).to_pylist() == [{RANK: 1, NUM_CANDIDATES: 1}]
    stats = nightly_stats(out, k=5)
    assert stats.single_candidate_queries == 1
    assert stats.compared_queries == 0  # no first-stage column, and one candidate anyway


def test_shard_split_and_order_do_not_change_the_result():
    rows = make_rows(7)
    whole = nightly_rows(table_of(rows)).to_pylist()
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    half = len(shuffled) // 2
    shards = pa.concat_tables([table_of(shuffled[half:]), table_of(shuffled[:half])])
    again = nightly_rows(shards).to_pylist()

    def key(r):
        return (r["reject_reason"] is not None, str(r["query_id"]), str(r["doc_id"]), r["doc"])

    assert len(again) == len(whole)
    for a, b in zip(sorted(whole, key=key), sorted(again, key=key), strict=True):
        assert all(_same(a[k], b[k]) for k in a)


def test_top_k_keeps_each_querys_best_k_and_every_rejected_row():
    rows = make_rows(3)
    ranked = nightly_rows(table_of(rows))
    kept = nightly_rows(table_of(rows), k=2).to_pandas()
    frame = ranked.to_pandas()
    scored = frame[frame["reject_reason"].isna()]
    expected = scored.groupby("query_id").apply(lambda g: min(len(g), 2), include_groups=False)
    got = kept[kept["reject_reason"].isna()].groupby("query_id").size()
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    assert (kept.loc[kept["reject_reason"].isna(), RANK] <= 2).all()
    assert kept["reject_reason"].notna().sum() == frame["reject_reason"].notna().sum()
    everything = nightly_group(table_of(rows), NightlyConfig(top_k=None))
    assert BELOW_TOP_K not in everything["reject_reason"].to_pylist()


def pandas_first_stage_stats(rows: list[dict], k: int) -> dict:
    """overlap@k and top-1 change computed with pandas from the de-duplicated input."""
    frame = pd.DataFrame(rows)
    frame = frame[frame["reject_reason"].isna()].copy()
    frame["s"] = frame["score"].fillna(-math.inf)  # NaN ranks last
    frame = frame.sort_values(
        ["query_id", "doc_id", "s", "retrieval_rank", "doc"], ascending=[1, 1, 0, 1, 1]
    )
    dedup = frame.drop_duplicates(["query_id", "doc_id"], keep="first")
    overlaps, changed = [], []
    for _, g in dedup.groupby("query_id"):
        if len(g) < 2:
            continue
        by_score = g.sort_values(["s", "doc_id"], ascending=[False, True])["doc_id"].tolist()
        by_first = g.sort_values(["retrieval_rank", "doc_id"])["doc_id"].tolist()
        overlaps.append(len(set(by_score[:k]) & set(by_first[:k])) / min(k, len(g)))
        changed.append(by_score[0] != by_first[0])
    return {
        "compared": len(overlaps),
        "mean_overlap": sum(overlaps) / len(overlaps),
        "top1_changed_share": sum(changed) / len(changed),
        "duplicates": len(frame) - len(dedup),
        "candidates": len(dedup),
        "queries": dedup["query_id"].nunique(),
    }


@pytest.mark.parametrize("seed", [0, 11])
def test_first_stage_stats_match_pandas_before_and_after_top_k_and_add_up(seed):
    rows = make_rows(seed, queries=40)
    k = 3
    ranked = nightly_rows(table_of(rows), first_stage="retrieval_rank")
    want = pandas_first_stage_stats(rows, k)

    full = nightly_stats(ranked, k)
    from_output = nightly_stats(nightly_rows(table_of(rows), "retrieval_rank", k), k)
    d = from_output.to_dict()
    assert d["compared_queries"] == want["compared"]
    assert d[f"mean_overlap_at_{k}"] == pytest.approx(want["mean_overlap"])
    assert d["top1_changed_share"] == pytest.approx(want["top1_changed_share"])
    assert d["duplicates_dropped"] == want["duplicates"]
    assert d["candidates"] == want["candidates"]
    assert d["queries"] == want["queries"]
    assert full.to_dict() | {"rows_kept": 0} == d | {"rows_kept": 0}

    # Partial sums per query group add up to the whole.
    frame = ranked.to_pandas()
    parts = [
        nightly_stats(pa.Table.from_pandas(g, schema=ranked.schema, preserve_index=False), k)
        for _, g in frame.groupby(frame["query_id"].fillna("<null>"))
    ]
    total = sum(parts[1:], parts[0])
    assert total.to_dict() == pytest.approx(full.to_dict())


def test_stats_without_first_stage_column_compare_nothing():
    rows = [r | {"retrieval_rank": None} for r in make_rows(2)]
    ranked = nightly_rows(table_of(rows).drop_columns(["retrieval_rank", "retrieval_score"]))
    d = nightly_stats(ranked, 5).to_dict()
    assert d["compared_queries"] == 0
    assert d["mean_overlap_at_5"] is None and d["top1_changed_share"] is None
    with pytest.raises(ValueError, match="k=5 and k=3"):
        NightlyStats(k=5) + NightlyStats(k=3)


def test_clear_errors_for_clashing_or_missing_columns():
    rows = make_rows(1)
    with pytest.raises(ValueError, match="no `retrieval_score` column"):
        nightly_rows(table_of(rows).drop_columns(["retrieval_score"]), "retrieval_score")
    clashing = table_of(rows).append_column("rank", pa.array([1] * len(rows)))
    with pytest.raises(ValueError, match=r"already has column\(s\) \['rank'\]"):
        nightly_rows(clashing)
    with pytest.raises(ValueError, match="needs the `score` column"):
        nightly_rows(table_of(rows).drop_columns(["score"]))


def test_nightly_group_emits_every_row_once_marking_what_it_leaves_out():
    rows = make_rows(12)
    table = table_of(rows)
    out = nightly_group(table, NightlyConfig(top_k=2))
    assert out.num_rows == table.num_rows

    frame = pd.DataFrame(rows)
    scored = frame[frame["reject_reason"].isna()]
    distinct = scored.drop_duplicates(["query_id", "doc_id"])
    sizes = distinct.groupby("query_id").size()
    reasons = out.to_pandas()["reject_reason"].value_counts(dropna=False).to_dict()
    assert reasons[DUPLICATE_PAIR] == len(scored) - len(distinct)
    assert reasons[BELOW_TOP_K] == (sizes - 2).clip(lower=0).sum()
    assert reasons["empty_doc"] + reasons["null_id"] == frame["reject_reason"].notna().sum()

    kept = out.filter(pa.compute.is_null(out["reject_reason"]))
    ranked = nightly_rows(table)  # no top-k: every candidate ranked
    expected = ranked.filter(pc.less_equal(ranked[RANK], 2))
    pd.testing.assert_frame_equal(kept.to_pandas(), expected.to_pandas())
    below = out.filter(pa.compute.equal(out["reject_reason"], BELOW_TOP_K))
    assert pa.compute.min(below[RANK]).as_py() == 3

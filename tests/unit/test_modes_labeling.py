"""Labeling mode: labels, hard negatives, counts, exports and the report (no Ray).

Expected values are computed here in plain Python / pandas from the ranked rows (ranking
itself is covered by test_modes_ranking.py).
"""

from __future__ import annotations

import json
import math
import random

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rerank_ray.modes.config import LabelConfig
from rerank_ray.modes.exports import (
    DISTILLATION_SCHEMA,
    FLAGEMBEDDING_KEYS,
    TRIPLET_SCHEMA,
    flagembedding_records,
    hard_negative_rows,
    hard_negative_schema,
    sentence_transformers_distillation,
    write_jsonl,
    write_parquet,
)
from rerank_ray.modes.groups import DUPLICATE_PAIR, labeling_group
from rerank_ray.modes.labeling import MODE_FIELDS, label_stats
from rerank_ray.modes.report import histogram_png, score_report
from tests.unit.test_modes_ranking import nightly_rows, without_marked

CFG = LabelConfig(
    pos_threshold=0.8,
    neg_threshold=0.4,
    hard_negative_min_rank=2,
    hard_negative_max_rank=9,
    margin=0.05,
    max_hard_negatives=3,
)


def make_table(seed: int, queries: int = 40) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    for q in range(queries):
        n = rng.choice([1, 2, 4, 8, 15, 25])
        for i in range(n):
            doc_id = f"d{i if rng.random() > 0.1 else 0}"  # some duplicate pairs
            score = round(rng.gauss(-1.0, 2.0), 2)
            rejected = rng.random() < 0.05
            rows.append(
                {
                    "query_id": q,
                    "query": f"query {q}",
                    "doc_id": doc_id,
                    "doc": f"q{q} passage {doc_id}",
                    "retrieval_rank": i + 1,
                    "is_positive": rng.choice([True, False, False, None]),
                    "score": None if rejected else score,
                    "score_norm": None if rejected else 1 / (1 + math.exp(-score)),
                    "reject_reason": "not_string_doc" if rejected else None,
                }
            )
    schema = pa.schema(
        [
            ("query_id", pa.int64()),
            ("query", pa.string()),
            ("doc_id", pa.string()),
            ("doc", pa.string()),
            ("retrieval_rank", pa.int32()),
            ("is_positive", pa.bool_()),
            ("score", pa.float32()),
            ("score_norm", pa.float32()),
            ("reject_reason", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def labeled_rows(table: pa.Table, cfg: LabelConfig) -> pa.Table:
    """What the labeling mode keeps of ``table`` (production ``labeling_group``): each query's
    de-duplicated candidates ranked and labeled, then the rejected rows."""
    return without_marked(labeling_group(table, cfg))


def reference_labels(table: pa.Table, cfg: LabelConfig) -> dict[tuple, tuple]:
    """(query_id, doc_id) -> (label, hard_negative), read off the contract per query."""
    ranked = nightly_rows(table).to_pylist()
    by_query: dict = {}
    for row in ranked:
        if row["reject_reason"] is None:
            by_query.setdefault(row["query_id"], []).append(row)
    expected = {}
    for qid, rows in by_query.items():
        rows.sort(key=lambda r: r["rank"])
        labels = []
        for r in rows:
            v = np.float32(r[cfg.score_column])
            if cfg.label_source == "given":
                labels.append({True: "pos", False: "neg", None: None}[r["is_positive"]])
            elif v >= np.float32(cfg.pos_threshold):
                labels.append("pos")
            elif v <= np.float32(cfg.neg_threshold):
                labels.append("neg")
            else:
                labels.append(None)
        pos_values = [
            r[cfg.score_column] for r, lab in zip(rows, labels, strict=True) if lab == "pos"
        ]
        taken = 0
        for r, lab in zip(rows, labels, strict=True):
            hard = (
                lab == "neg"
                and bool(pos_values)
                and cfg.hard_negative_min_rank <= r["rank"] <= cfg.hard_negative_max_rank
                and r[cfg.score_column] <= min(pos_values) - cfg.margin
                and (
                    cfg.relative_margin is None
                    or r[cfg.score_column] <= min(pos_values) * (1 - cfg.relative_margin)
                )
                and (cfg.max_score is None or r[cfg.score_column] <= cfg.max_score)
                and taken < cfg.max_hard_negatives
            )
            taken += hard
            expected[(qid, r["doc_id"])] = (lab, hard)
    return expected


def scored_rows(labeled: pa.Table) -> list[dict]:
    return [r for r in labeled.to_pylist() if r["reject_reason"] is None]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0),
        LabelConfig(
            score_column="score",
            pos_threshold=1.0,
            neg_threshold=-0.5,
            hard_negative_min_rank=3,
            hard_negative_max_rank=20,
            margin=0.5,
            max_hard_negatives=2,
        ),
        LabelConfig(
            label_source="given",
            hard_negative_min_rank=1,
            margin=0.0,
            relative_margin=0.1,
            max_score=0.3,
        ),
    ],
    ids=["threshold-norm", "given", "threshold-logit", "given-relative-margin-max-score"],
)
def test_labels_and_hard_negatives_match_the_contract(seed, cfg):
    table = make_table(seed)
    labeled = labeled_rows(table, cfg)
    expected = reference_labels(table, cfg)
    got = {
        (r["query_id"], r["doc_id"]): (r["label"], r["hard_negative"]) for r in scored_rows(labeled)
    }
    assert got == expected
    assert sum(hard for _, hard in got.values()) > 0  # the case under test is exercised


def test_rejected_rows_are_never_labeled():
    table = make_table(4)
    labeled = labeled_rows(table, CFG)
    rejected = labeled.filter(labeled["reject_reason"].is_valid())
    assert rejected.num_rows == table.filter(table["reject_reason"].is_valid()).num_rows > 0
    for f in MODE_FIELDS:
        assert rejected[f.name].null_count == rejected.num_rows
    original = table.filter(table["reject_reason"].is_valid())
    assert rejected.select(table.column_names).to_pylist() == original.to_pylist()


def test_float32_score_at_the_threshold_counts_as_positive():
    rows = [
        {"query_id": 1, "query": "q", "doc_id": "a", "doc": "a", "score": 0.85, "score_norm": 0.7},
        {"query_id": 1, "query": "q", "doc_id": "b", "doc": "b", "score": -1.0, "score_norm": 0.3},
    ]
    table = pa.Table.from_pylist(rows).cast(
        pa.schema(
            [
                ("query_id", pa.int64()),
                ("query", pa.string()),
                ("doc_id", pa.string()),
                ("doc", pa.string()),
                ("score", pa.float32()),
                ("score_norm", pa.float32()),
            ]
        )
    )
    cfg = LabelConfig(pos_threshold=0.7, neg_threshold=0.3, hard_negative_min_rank=1)
    assert labeled_rows(table, cfg)["label"].to_pylist() == ["pos", "neg"]


def test_given_labels_need_a_boolean_is_positive_column():
    table = make_table(0)
    cfg = LabelConfig(label_source="given")
    with pytest.raises(ValueError, match="no `is_positive` column"):
        labeled_rows(table.drop_columns(["is_positive"]), cfg)
    as_int = table.set_column(
        table.schema.get_field_index("is_positive"),
        "is_positive",
        pa.array([int(v) if v is not None else None for v in table["is_positive"].to_pylist()]),
    )
    assert labeled_rows(as_int, cfg)["label"].equals(labeled_rows(table, cfg)["label"])
    as_text = table.set_column(
        table.schema.get_field_index("is_positive"), "is_positive", table["query"]
    )
    with pytest.raises(ValueError, match="must be boolean"):
        labeled_rows(as_text, cfg)


def test_counts_match_pandas_and_partial_counts_add_up():
    table = make_table(9, queries=60)
    labeled = labeled_rows(table, CFG)
    frame = labeled.to_pandas()
    scored = frame[frame["reject_reason"].isna()]
    per_q = scored.groupby("query_id").agg(
        pos=("label", lambda s: (s == "pos").sum()),
        neg=("label", lambda s: (s == "neg").sum()),
        hard=("hard_negative", "sum"),
        n=("doc_id", "size"),
    )
    raw = table.to_pandas()
    raw_scored = raw[raw["reject_reason"].isna()]
    stats = label_stats(labeled)
    assert stats.queries == len(per_q)
    assert stats.positives == (scored["label"] == "pos").sum()
    assert stats.negatives == (scored["label"] == "neg").sum()
    assert stats.unlabeled == scored["label"].isna().sum()
    assert stats.hard_negatives == scored["hard_negative"].sum()
    assert stats.queries_no_positive == (per_q["pos"] == 0).sum() > 0
    assert stats.queries_no_negative == (per_q["neg"] == 0).sum() > 0
    assert stats.queries_no_hard_negative == ((per_q["pos"] > 0) & (per_q["hard"] == 0)).sum()
    assert stats.exportable_queries == ((per_q["pos"] > 0) & (per_q["hard"] > 0)).sum()
    assert stats.single_candidate_queries == (per_q["n"] == 1).sum() > 0
    assert stats.duplicates_dropped == len(raw_scored) - len(scored) > 0
    assert stats.rejected_rows == raw["reject_reason"].notna().sum()

    ids = sorted(frame["query_id"].dropna().unique())
    first = labeled.filter(pa.compute.is_in(labeled["query_id"], pa.array(ids[:20])))
    rest = labeled.filter(
        pa.compute.invert(pa.compute.is_in(labeled["query_id"], pa.array(ids[:20])))
    )
    assert label_stats(first) + label_stats(rest) == stats


def emulate_flagembedding_getitem(data: dict, train_group_size: int, rng: random.Random) -> list:
    """The steps FlagEmbedding's AbsRerankerTrainDataset.__getitem__ takes on one record
    (FlagEmbedding/abc/finetune/reranker/AbsDataset.py, with knowledge_distillation on)."""
    assert isinstance(data["pos"], list) and isinstance(data["neg"], list)
    pos_idx = rng.choice(list(range(len(data["pos"]))))
    neg_all_idx = list(range(len(data["neg"])))
    if len(data["neg"]) < train_group_size - 1:
        num = math.ceil((train_group_size - 1) / len(data["neg"]))
        neg_idxs = rng.sample(neg_all_idx * num, train_group_size - 1)
    else:
        neg_idxs = rng.sample(neg_all_idx, train_group_size - 1)
    teacher = [data["pos_scores"][pos_idx]] + [data["neg_scores"][i] for i in neg_idxs]
    assert all(isinstance(score, (int, float)) for score in teacher)
    return teacher


def test_flagembedding_jsonl_has_the_loader_fields_and_the_labeled_content(tmp_path):
    table = make_table(3, queries=60)
    labeled = labeled_rows(table, CFG)
    path = tmp_path / "train.jsonl"
    count = write_jsonl(flagembedding_records(labeled, CFG), str(path))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert count == len(lines) == label_stats(labeled).exportable_queries > 0

    frame = labeled.to_pandas()
    frame = frame[frame["reject_reason"].isna()].sort_values(["query_id", "rank"])
    expected = []
    for _, g in frame.groupby("query_id"):
        pos, neg = g[g["label"] == "pos"], g[g["hard_negative"].astype(bool)]
        if len(pos) and len(neg):
            expected.append(
                {
                    "query": g["query"].iloc[0],
                    "pos": pos["doc"].tolist(),
                    "neg": neg["doc"].tolist(),
                    "pos_scores": pos["score"].astype(float).tolist(),
                    "neg_scores": neg["score"].astype(float).tolist(),
                }
            )
    assert lines == expected
    rng = random.Random(0)
    for record in lines:
        assert tuple(record) == FLAGEMBEDDING_KEYS
        assert len(record["pos"]) == len(record["pos_scores"]) > 0
        assert len(record["neg"]) == len(record["neg_scores"]) > 0
        emulate_flagembedding_getitem(record, train_group_size=8, rng=rng)
    # The same lines as a column table, as `datasets.load_dataset("json")` would see them.
    columns = pd.read_json(path, lines=True)
    assert list(columns.columns) == list(FLAGEMBEDDING_KEYS)


def test_exports_do_not_depend_on_row_order_and_cap_positives(tmp_path):
    labeled = labeled_rows(make_table(5), CFG)
    shuffled = labeled.take(np.random.default_rng(0).permutation(labeled.num_rows))
    assert list(flagembedding_records(shuffled, CFG)) == list(flagembedding_records(labeled, CFG))
    one = LabelConfig(**{**CFG.__dict__, "max_positives": 1})
    records = list(flagembedding_records(labeled, one))
    assert records and all(len(r["pos"]) == 1 for r in records)
    full = {r["query"]: r for r in flagembedding_records(labeled, CFG)}
    assert all(r["pos"][0] == full[r["query"]]["pos"][0] for r in records)


def test_sentence_transformers_parquet_triplets_and_distillation(tmp_path):
    labeled = labeled_rows(make_table(6, queries=50), CFG)
    triplets = hard_negative_rows(labeled, CFG)
    distill = sentence_transformers_distillation(labeled, CFG)
    write_parquet(triplets, str(tmp_path / "triplets.parquet"))
    write_parquet(distill, str(tmp_path / "distillation.parquet"))

    read_triplets = pq.read_table(tmp_path / "triplets.parquet")
    assert read_triplets.schema.equals(TRIPLET_SCHEMA)
    want = [
        {"query": r["query"], "positive": p, "negative": n}
        for r in flagembedding_records(labeled, CFG)
        for p in r["pos"]
        for n in r["neg"]
    ]
    assert read_triplets.to_pylist() == want and want

    read_distill = pq.read_table(tmp_path / "distillation.parquet")
    assert read_distill.schema.equals(DISTILLATION_SCHEMA)
    frame = labeled.to_pandas()
    scored = frame[frame["reject_reason"].isna()].sort_values(["query_id", "rank"])
    pd.testing.assert_frame_equal(
        read_distill.to_pandas(),
        pd.DataFrame(
            {
                "query": scored["query"].to_numpy(),
                "passage": scored["doc"].to_numpy(),
                "score": scored["score"].to_numpy(dtype="float32"),
            }
        ),
    )


def test_score_report_counts_match_pandas_and_partials_add_up():
    table = make_table(8, queries=50)
    labeled = labeled_rows(table, CFG)
    report = score_report(labeled, CFG)
    frame = labeled.to_pandas()
    scored = frame[frame["reject_reason"].isna()]
    values = scored["score_norm"]
    assert report.rows == len(scored) and sum(report.counts) == len(scored)
    for row in report.threshold_rows():
        t = np.float32(row["threshold"])
        assert row["rows_at_or_above"] == (values >= t).sum()
        assert row["rows_at_or_below"] == (values <= t).sum()
        assert row["queries_with_row_at_or_above"] == scored[values >= t]["query_id"].nunique()
        assert row["queries_with_row_at_or_below"] == scored[values <= t]["query_id"].nunique()
    at_pos = next(r for r in report.threshold_rows() if r["threshold"] == CFG.pos_threshold)
    assert at_pos["rows_at_or_above"] == label_stats(labeled).positives

    expected_counts, _ = np.histogram(values.to_numpy(), bins=np.linspace(0, 1, 51))
    assert list(report.counts) == expected_counts.tolist()

    low = labeled.filter(pa.compute.less(labeled["query_id"], 25))
    high = labeled.filter(pa.compute.greater_equal(labeled["query_id"], 25))
    merged = score_report(low, CFG) + score_report(high, CFG)
    assert merged.to_dict() == {**report.to_dict(), "queries": merged.queries}
    assert merged.queries == report.queries

    raw_cfg = LabelConfig(score_column="score", pos_threshold=1.0, neg_threshold=-1.0)
    with pytest.raises(ValueError, match="value_range"):
        score_report(labeled, raw_cfg)
    raw = score_report(labeled, raw_cfg, value_range=(scored["score"].min(), scored["score"].max()))
    assert sum(raw.counts) == len(scored) and len(raw.thresholds) == 19


def test_histogram_png_is_a_readable_image(tmp_path):
    labeled = labeled_rows(make_table(2), CFG)
    png = histogram_png(score_report(labeled, CFG), CFG)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "hist.png"
    path.write_bytes(png)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_labeling_group_emits_every_row_once_marking_duplicates():
    table = make_table(13).drop_columns(["reject_reason"])  # the column is optional here
    out = labeling_group(table, CFG)
    assert out.num_rows == table.num_rows
    distinct = table.to_pandas().drop_duplicates(["query_id", "doc_id"])
    duplicates = out.filter(pa.compute.equal(out["reject_reason"], DUPLICATE_PAIR))
    assert duplicates.num_rows == table.num_rows - len(distinct) > 0
    assert duplicates["label"].null_count == duplicates.num_rows
    kept = out.filter(pa.compute.is_null(out["reject_reason"]))
    got = {(r["query_id"], r["doc_id"]): (r["label"], r["hard_negative"]) for r in kept.to_pylist()}
    assert got == reference_labels(table, CFG)


def test_relative_margin_and_max_score_leave_out_negatives_close_to_the_positive():
    table = make_table(9, queries=60)
    plain = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    hard = label_stats(labeled_rows(table, plain)).hard_negatives
    for extra in ({"relative_margin": 0.2}, {"max_score": 0.2}):
        filtered = LabelConfig(**{**plain.__dict__, **extra})
        assert 0 < label_stats(labeled_rows(table, filtered)).hard_negatives < hard, extra


def expected_hard_negative_rows(records: list[dict], cfg: LabelConfig) -> list[dict]:
    """Each format's rows, as sentence-transformers' mine_hard_negatives lays them out
    (sentence_transformers/util/hard_negatives.py, v5), from the FlagEmbedding records."""
    fmt, n = cfg.hard_negative_format, cfg.max_hard_negatives
    rows = []
    for r in records:
        q, negs = r["query"], r["neg"]
        for p, p_score in zip(r["pos"], r["pos_scores"], strict=True):
            if fmt == "triplet":
                rows += [{"query": q, "positive": p, "negative": neg} for neg in negs]
            elif fmt == "labeled-list":
                rows.append({"query": q, "positive": [p, *negs], "labels": [1] + [0] * len(negs)})
            elif fmt in ("n-tuple", "n-tuple-scores") and len(negs) == n:
                row = {"query": q, "positive": p}
                row |= {f"negative_{i}": neg for i, neg in enumerate(negs, start=1)}
                if fmt == "n-tuple-scores":
                    row["score"] = [p_score, *r["neg_scores"]]
                rows.append(row)
        if fmt == "labeled-pair":
            rows += [{"query": q, "positive": p, "label": 1} for p in r["pos"]]
            rows += [{"query": q, "positive": neg, "label": 0} for neg in negs]
    return rows


@pytest.mark.parametrize(
    "fmt", ["triplet", "n-tuple", "n-tuple-scores", "labeled-pair", "labeled-list"]
)
def test_hard_negative_formats_load_with_datasets_as_sentence_transformers_writes_them(
    fmt, tmp_path
):
    from datasets import load_dataset

    cfg = LabelConfig(**{**CFG.__dict__, "hard_negative_format": fmt, "max_hard_negatives": 2})
    labeled = labeled_rows(make_table(11, queries=80), cfg)
    rows = hard_negative_rows(labeled, cfg)
    assert rows.schema.equals(hard_negative_schema(cfg))
    records = list(flagembedding_records(labeled, cfg))
    expected = expected_hard_negative_rows(records, cfg)
    if fmt == "labeled-pair":
        # Queries with a positive but no hard negative keep their positives (label 1).
        with_positive = {r["query"] for r in rows.to_pylist() if r["label"] == 1}
        assert with_positive >= {r["query"] for r in records}
        exportable = {r["query"] for r in records}
        assert [r for r in rows.to_pylist() if r["query"] in exportable] == expected
        assert expected
    else:
        got = rows.to_pylist()
        for row in got:
            if "score" in row:
                row["score"] = pytest.approx(row["score"], rel=1e-6)
        assert got == expected and expected
    write_parquet(rows, str(tmp_path / "shard-00000.parquet"))
    write_parquet(rows.slice(0, 1), str(tmp_path / "shard-00001.parquet"))
    loaded = load_dataset(
        "parquet", data_files=sorted(str(p) for p in tmp_path.glob("*.parquet")), split="train"
    )
    assert loaded.column_names == hard_negative_schema(cfg).names
    assert loaded.num_rows == rows.num_rows + 1
    assert loaded[0] == rows.slice(0, 1).to_pylist()[0]

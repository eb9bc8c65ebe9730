"""The per-block step of the modes, without a cluster: blocks of whole queries processed one
by one give, once their partials are added up and their export shards read together, what
the whole table gives at once."""

from __future__ import annotations

import dataclasses
import json
import pickle
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.exports import flagembedding_records, hard_negative_rows
from rerank_ray.modes.labeling import label_stats
from rerank_ray.modes.ranking import nightly_stats
from rerank_ray.modes.registry import LABELING, NIGHTLY
from rerank_ray.modes.report import score_report
from rerank_ray.modes.stage import RESULT_COLUMN, ValueRange, merge_partials, process_block
from rerank_ray.sink import OutputLocation, RerankSink
from rerank_ray.storage import S3Settings
from tests.unit.test_modes_labeling import labeled_rows, make_table
from tests.unit.test_modes_ranking import nightly_rows


def blocks_of_whole_queries(table: pa.Table, parts: int, seed: int) -> list[pa.Table]:
    """``table`` split into ``parts`` blocks by a random assignment of its query ids."""
    rng = random.Random(seed)
    ids = table["query_id"].unique().to_pylist()
    part_of = {q: rng.randrange(parts) for q in ids}
    return [
        table.filter(pc.is_in(table["query_id"], pa.array([q for q in ids if part_of[q] == p])))
        for p in range(parts)
    ]


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def run_blocks(mode, cfg, table: pa.Table, tmp_path, value_range=None) -> list:
    out = OutputLocation(str(tmp_path / "out"), S3Settings(None, None, True), "r1")
    sink = RerankSink(out, "2026-11-30", [], expected_rows=table.num_rows, manifest_extra={})
    scored = table.filter(pc.is_null(table["reject_reason"])).drop_columns(["reject_reason"])
    scored = scored.append_column("truncated", pa.array([False] * scored.num_rows))
    results = []
    for block in blocks_of_whole_queries(scored, 3, seed=1):
        row = process_block(
            block,
            group=mode.group,
            exports=mode.exports(cfg),
            partials=lambda rows, c: mode.partials(rows, c, value_range),
            cfg=cfg,
            sink=sink,
        )
        results.append(pickle.loads(row[RESULT_COLUMN][0].as_py()))
    return scored, results


def test_labeling_blocks_add_up_to_the_whole_run(tmp_path):
    cfg = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    scored, results = run_blocks(LABELING, cfg, make_table(21, queries=90), tmp_path)
    merged = merge_partials(results)
    whole = labeled_rows(scored, cfg)
    # In a block, the duplicate copies the mode marks are its rejected rows (the run's
    # report takes rejected_rows from the manifest, which adds the scoring's rejects).
    duplicates = merged["stats"].duplicates_dropped
    assert duplicates > 0
    assert merged["stats"] == dataclasses.replace(label_stats(whole), rejected_rows=duplicates)
    assert merged["score_report"].to_dict() == score_report(whole, cfg).to_dict()
    values = whole["score_norm"].to_pylist()
    assert merged["range"] == ValueRange(min(values), max(values))
    # Every row written once, by the sink's write of each block.
    assert sum(e["scored"] + e["rejected"] for r in results for e in r.entries) == scored.num_rows
    # The export shards hold the whole run's records, each once.
    shards = [r.exports["flagembedding_jsonl"][0] for r in results if r.exports]
    got = [json.loads(line) for path in shards for line in read_lines(path)]
    want = list(flagembedding_records(whole, cfg))
    assert sorted(got, key=lambda r: r["query"]) == sorted(want, key=lambda r: r["query"])
    assert len(shards) == 3 and want
    triplets = pa.concat_tables(
        pq.read_table(r.exports["hard_negatives_parquet"][0]) for r in results if r.exports
    )
    assert sorted(triplets.to_pylist(), key=str) == sorted(
        hard_negative_rows(whole, cfg).to_pylist(), key=str
    )


def test_raw_score_report_shares_the_run_wide_bins(tmp_path):
    cfg = LabelConfig(score_column="score", pos_threshold=1.0, neg_threshold=-1.0)
    table = make_table(22, queries=60)
    scored = table.filter(pc.is_null(table["reject_reason"]))
    bounds = pc.min_max(scored["score"])
    value_range = (bounds["min"].as_py(), bounds["max"].as_py())
    _, results = run_blocks(LABELING, cfg, table, tmp_path, value_range)
    merged = merge_partials(results)["score_report"]
    whole = score_report(
        labeled_rows(scored.drop_columns(["reject_reason"]), cfg), cfg, value_range
    )
    assert merged.to_dict() == whole.to_dict()


def test_nightly_blocks_add_up_to_the_whole_run(tmp_path):
    cfg = NightlyConfig(top_k=3)
    scored, results = run_blocks(NIGHTLY, cfg, make_table(23, queries=80), tmp_path)
    merged = merge_partials(results)["stats"]
    want = nightly_stats(nightly_rows(scored, k=3), 3)
    for name in ("queries", "candidates", "duplicates_dropped", "rows_kept", "compared_queries"):
        assert getattr(merged, name) == getattr(want, name), name
    assert merged.overlap_at_k_sum == pytest.approx(want.overlap_at_k_sum)
    assert not any(r.exports for r in results)  # the nightly mode exports nothing


def test_an_empty_block_gives_an_empty_result(tmp_path):
    out = OutputLocation(str(tmp_path), S3Settings(None, None, True), "r1")
    sink = RerankSink(out, "2026-11-30", [], expected_rows=0, manifest_extra={})
    row = process_block(pa.table({}), group=None, exports=(), partials=None, cfg=None, sink=sink)
    result = pickle.loads(row[RESULT_COLUMN][0].as_py())
    assert (result.entries, result.exports, result.partials) == ([], {}, {})
    assert not list(tmp_path.rglob("*.parquet"))

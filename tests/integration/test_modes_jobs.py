"""Job modes end to end on a local Ray instance, the S3 test server and a tiny real model.

A plain scoring run of the same input is the reference: the modes' outputs must equal what the
pure per-query functions give on those scores (so shards and shuffles change nothing).
"""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rerank_ray import pipeline, storage
from rerank_ray.config import JobConfig
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.exports import FLAGEMBEDDING_KEYS, flagembedding_records
from rerank_ray.modes.labeling import label_queries
from rerank_ray.modes.ranking import nightly_stats, rank_queries, top_k
from rerank_ray.modes.run import run_labeling, run_nightly
from tests.conftest import make_pairs, upload_table

pytestmark = pytest.mark.integration


def shards() -> list[pa.Table]:
    """Two shards splitting each query's candidates, one duplicate pair, one empty doc."""
    table = make_pairs(60, seed=3, queries=6)
    rng = random.Random(0)
    table = table.append_column(
        "is_positive", pa.array([rng.random() < 0.25 for _ in range(table.num_rows)])
    )
    duplicate = table.slice(0, 1)
    empty = table.slice(1, 1).set_column(3, "doc", pa.array([""]))
    return [table.slice(0, 30), pa.concat_tables([table.slice(30), duplicate, empty])]


def job(bucket: str, model_dir, name: str) -> JobConfig:
    """Input and output both on the S3 test server."""
    return JobConfig(
        input=f"s3://{bucket}/in/",
        output=f"s3://{bucket}/{name}/",
        model=str(model_dir),
        device="cpu",
        num_actors=1,
        tokenize_actors=1,
        batch_rows=16,
        run_date="2026-11-21",
    )


def read(cfg: JobConfig) -> pa.Table:
    fs, base = storage.resolve(cfg.output, pipeline.s3_settings(cfg))
    return pads.dataset(base, filesystem=fs, format="parquet", partitioning="hive").to_table()


def read_bytes(cfg: JobConfig, relative: str) -> bytes:
    fs, base = storage.resolve(cfg.output, pipeline.s3_settings(cfg))
    with fs.open_input_stream(storage.join(base, relative)) as f:
        return f.read()


@pytest.fixture
def scored_reference(ray_local, bucket, tiny_model_dir, tmp_path):
    for i, shard in enumerate(shards()):
        upload_table(bucket, f"in/part-{i}.parquet", shard)
    plain = job(bucket, tiny_model_dir, "plain")
    pipeline.run(plain)
    return read(plain).drop_columns(["run_date"])


def test_nightly_top_k_across_shards(scored_reference, bucket, tiny_model_dir, tmp_path):
    cfg = job(bucket, tiny_model_dir, "nightly")
    mode = NightlyConfig(top_k=3)
    report = run_nightly(cfg, mode)

    out = read(cfg)
    expected = top_k(rank_queries(scored_reference), 3)
    key = ["query_id", "rank"]
    got = out.drop_columns(["run_date"]).sort_by([(k, "ascending") for k in key])
    want = expected.select(got.column_names).sort_by([(k, "ascending") for k in key])
    assert got.select(["query_id", "doc_id", "rank", "num_candidates"]).equals(
        want.select(["query_id", "doc_id", "rank", "num_candidates"])
    )
    assert max(got["rank"].to_pylist()) == 3

    manifest = json.loads(read_bytes(cfg, "_SUCCESS"))
    n_input = sum(s.num_rows for s in shards())
    reasons = manifest["rejects_by_reason"]
    assert manifest["rows_read"] == n_input
    assert reasons["duplicate_pair"] == 1
    # Candidates below the top k are counted, not written (they are most of a nightly run).
    below = scored_reference.num_rows - 1 - got.num_rows
    assert "below_top_k" not in reasons
    assert manifest["filtered_by_reason"] == {"below_top_k": below}
    assert manifest["rows_filtered"] == below > 0
    assert manifest["rows_scored"] == got.num_rows
    assert manifest["rows_scored"] + manifest["rows_rejected"] + below == n_input
    # After the per-query shuffle a data file holds rows of several input shards: files are
    # not split per shard (which made one file per write task and shard).
    seen = [(d, i) for i, t in enumerate(shards()) for d in t["doc_id"].to_pylist()]
    ids = [d for d, _ in seen]
    shard_of = {d: i for d, i in seen if ids.count(d) == 1}  # the duplicate pair is in both
    data_files = [f for f in manifest["files"] if not f.startswith("_rejects/")]
    shards_per_file = [
        len(
            {
                shard_of[d]
                for d in pq.read_table(pa.BufferReader(read_bytes(cfg, f)))["doc_id"].to_pylist()
                if d in shard_of
            }
        )
        for f in data_files
    ]
    assert max(shards_per_file) > 1, shards_per_file

    want_stats = nightly_stats(rank_queries(scored_reference), 3).to_dict()
    for name in ("queries", "candidates", "compared_queries", "top1_changed"):
        assert report["stats"][name] == want_stats[name]
    assert report["stats"]["mean_overlap_at_3"] == pytest.approx(want_stats["mean_overlap_at_3"])
    assert json.loads(read_bytes(cfg, "_mode_report.json")) == json.loads(
        json.dumps(report, default=float)
    )


def test_labeling_exports(scored_reference, bucket, tiny_model_dir, tmp_path):
    cfg = job(bucket, tiny_model_dir, "labels")
    mode = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    report = run_labeling(cfg, mode)

    lines = read_bytes(cfg, report["exports"]["flagembedding_jsonl"]["path"]).decode()
    records = [json.loads(line) for line in lines.splitlines()]
    expected = list(flagembedding_records(label_queries(scored_reference, mode), mode))
    assert len(records) == len(expected) == report["stats"]["exportable_queries"] > 0
    for got, want in zip(records, expected, strict=True):
        assert tuple(got) == FLAGEMBEDDING_KEYS
        assert got["pos"] == want["pos"] and got["neg"] == want["neg"]
        assert got["pos_scores"] == pytest.approx(want["pos_scores"], abs=1e-6)
        assert all(isinstance(s, float) and math.isfinite(s) for s in got["neg_scores"])

    fs, base = storage.resolve(cfg.output, pipeline.s3_settings(cfg))
    triplets = pq.read_table(
        storage.join(base, report["exports"]["triplets_parquet"]["path"]), filesystem=fs
    )
    assert triplets.column_names == ["query", "positive", "negative"]
    assert triplets.num_rows == sum(len(r["pos"]) * len(r["neg"]) for r in records)
    distill = pq.read_table(
        storage.join(base, report["exports"]["distillation_parquet"]["path"]), filesystem=fs
    )
    assert distill.column_names == ["query", "passage", "score"]
    assert distill.num_rows == scored_reference.num_rows - 1  # the duplicate pair, once
    # sentence-transformers reads training data through `datasets`: load both exports so.
    from datasets import load_dataset

    for name, columns in (
        ("triplets_parquet", ["query", "positive", "negative"]),
        ("distillation_parquet", ["query", "passage", "score"]),
    ):
        local = tmp_path / f"{name}.parquet"
        local.write_bytes(read_bytes(cfg, report["exports"][name]["path"]))
        loaded = load_dataset("parquet", data_files=str(local), split="train")
        assert loaded.column_names == columns
        assert loaded.num_rows == report["exports"][name]["rows"]
    png = read_bytes(cfg, report["exports"]["score_histogram_png"]["path"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(report["score_report"]["histogram"]["counts"]) == distill.num_rows

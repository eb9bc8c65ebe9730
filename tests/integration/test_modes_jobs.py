"""Job modes end to end on a local Ray instance, the S3 test server and a tiny real model.

A plain scoring run of the same input is the reference: the modes' outputs must equal what the
pure per-query functions give on those scores (so shards and shuffles change nothing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import math
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rerank_ray import pipeline, storage
from rerank_ray.config import JobConfig
from rerank_ray.modes import run as run_module
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.exports import FLAGEMBEDDING_KEYS, flagembedding_records
from rerank_ray.modes.labeling import MODE_FIELDS
from rerank_ray.modes.ranking import nightly_stats
from rerank_ray.modes.run import run_labeling, run_nightly
from rerank_ray.sink.location import list_files
from tests.conftest import kill_when_half_staged, local_job, make_pairs, upload_table
from tests.integration.test_multinode import assert_exactly_once, write_shards
from tests.unit.test_modes_labeling import labeled_rows
from tests.unit.test_modes_ranking import nightly_rows

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
    # A handler on the job's own logger: caplog's, on the root logger, did not get the job's
    # INFO records once Ray had started in this process.
    said = logging.handlers.BufferingHandler(capacity=10_000)
    logger = logging.getLogger("rerank_ray")
    level = logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        report = run_nightly(cfg, mode)
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
    # After the scoring stage's progress line (100%), the log says what runs next.
    lines = [r.getMessage() for r in said.buffer]
    assert any(re.search(r"\d+ rows scored; nightly: grouping them by query", m) for m in lines)

    out = read(cfg)
    expected = nightly_rows(scored_reference, k=3)
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

    want_stats = nightly_stats(nightly_rows(scored_reference), 3).to_dict()
    for name in ("queries", "candidates", "compared_queries", "top1_changed"):
        assert report["stats"][name] == want_stats[name]
    assert report["stats"]["mean_overlap_at_3"] == pytest.approx(want_stats["mean_overlap_at_3"])
    # The stats count what the manifest counts (issue 11: they said 0 rejected against 2).
    assert report["stats"]["rejected_rows"] == manifest["rows_rejected"] == sum(reasons.values())
    assert manifest["rows_rejected"] == 2  # the empty doc and the duplicate pair
    assert report["stats"]["filtered_rows"] == manifest["rows_filtered"] == below
    assert report["stats"]["rows_scored_by_model"] == scored_reference.num_rows
    assert report["stats"]["rows_kept"] == manifest["rows_scored"]
    assert json.loads(read_bytes(cfg, "_mode_report.json")) == json.loads(
        json.dumps(report, default=float)
    )
    # The scoring stage is gone once the run is committed.
    fs, base = storage.resolve(cfg.output, pipeline.s3_settings(cfg))
    assert not list_files(fs, storage.join(base, "_scored"))


def read_jsonl_shards(cfg: JobConfig, files: list[str]) -> list[dict]:
    return [json.loads(line) for f in files for line in read_bytes(cfg, f).decode().splitlines()]


def test_labeling_exports(scored_reference, bucket, tiny_model_dir, tmp_path):
    cfg = dataclasses.replace(job(bucket, tiny_model_dir, "labels"), run_id="labels-1")
    mode = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    report = run_labeling(cfg, mode)
    exports = report["exports"]
    manifest = json.loads(read_bytes(cfg, "_SUCCESS"))

    # Sharded exports, every shard listed in the manifest (so a rerun replaces them).
    fe_files = exports["flagembedding_jsonl"]["files"]
    assert len(fe_files) > 1, fe_files  # one shard per block of queries
    assert fe_files == [
        f"_exports/labels-1/flagembedding/train-{i:05d}.jsonl" for i in range(len(fe_files))
    ]
    for name in ("flagembedding_jsonl", "hard_negatives_parquet", "distillation_parquet"):
        assert set(exports[name]["files"]) <= set(manifest["files"])
    records = read_jsonl_shards(cfg, fe_files)
    expected = list(flagembedding_records(labeled_rows(scored_reference, mode), mode))
    assert len(records) == len(expected) == report["stats"]["exportable_queries"] > 0
    assert len(records) == exports["flagembedding_jsonl"]["rows"]
    by_query = {r["query"]: r for r in records}
    assert len(by_query) == len(records)
    for want in expected:
        got = by_query[want["query"]]
        assert tuple(got) == FLAGEMBEDDING_KEYS
        assert got["pos"] == want["pos"] and got["neg"] == want["neg"]
        assert got["pos_scores"] == pytest.approx(want["pos_scores"], abs=1e-6)
        assert all(isinstance(s, float) and math.isfinite(s) for s in got["neg_scores"])

    # sentence-transformers reads training data through `datasets`: load every shard so.
    from datasets import load_dataset

    def load(name: str):
        local = []
        for i, f in enumerate(exports[name]["files"]):
            path = tmp_path / f"{name}-{i:05d}.parquet"
            path.write_bytes(read_bytes(cfg, f))
            local.append(str(path))
        return load_dataset("parquet", data_files=local, split="train")

    triplets = load("hard_negatives_parquet")
    assert triplets.column_names == ["query", "positive", "negative"]
    assert triplets.num_rows == sum(len(r["pos"]) * len(r["neg"]) for r in records)
    assert triplets.num_rows == exports["hard_negatives_parquet"]["rows"]
    distill = load("distillation_parquet")
    assert distill.column_names == ["query", "passage", "score"]
    assert distill.num_rows == scored_reference.num_rows - 1  # the duplicate pair, once
    assert distill.num_rows == exports["distillation_parquet"]["rows"]
    png = read_bytes(cfg, exports["score_histogram_png"]["files"][0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(report["score_report"]["histogram"]["counts"]) == distill.num_rows
    assert report["stats"]["rejected_rows"] == manifest["rows_rejected"]
    assert report["warnings"] == []

    # A rerun of the run id with another format replaces the exports of the first commit.
    mode2 = LabelConfig(**{**mode.__dict__, "hard_negative_format": "labeled-list"})
    report2 = run_labeling(cfg, mode2)
    manifest2 = json.loads(read_bytes(cfg, "_SUCCESS"))
    lists = report2["exports"]["hard_negatives_parquet"]["files"]
    assert lists and all("labeled-lists-" in f for f in lists)
    assert not [f for f in manifest2["files"] if "triplets-" in f]
    fs, base = storage.resolve(cfg.output, pipeline.s3_settings(cfg))
    left = list_files(fs, storage.join(base, "_exports"))
    assert not [f for f in left if "triplets-" in f], left


def test_labeling_that_exports_nothing_says_why(scored_reference, bucket, tiny_model_dir, caplog):
    cfg = job(bucket, tiny_model_dir, "empty")
    # The tiny random model scores every pair near 0.45: default thresholds label nothing.
    with caplog.at_level(logging.WARNING, logger="rerank_ray"):
        report = run_labeling(cfg, LabelConfig())
    assert report["exports"]["flagembedding_jsonl"] == {"files": [], "rows": 0}
    (warning,) = report["warnings"]
    assert "exported no training records" in warning
    assert "pos_threshold 0.7" in warning and "neg_threshold 0.3" in warning
    low, high = (float(x) for x in re.search(r"ranged (\d+\.\d+)\.\.(\d+\.\d+)", warning).groups())
    scores = scored_reference["score_norm"].to_pylist()
    assert low == pytest.approx(min(scores), rel=1e-3) and high == pytest.approx(
        max(scores), rel=1e-3
    )
    assert warning in caplog.text


def labeled_reference(out: Path, mode: LabelConfig) -> list[dict]:
    """FlagEmbedding records computed from the committed scored rows (mode columns dropped)."""
    committed = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    plain = committed.drop_columns([*(f.name for f in MODE_FIELDS), "run_date"])
    return list(flagembedding_records(labeled_rows(plain, mode), mode))


def committed_records(out: Path) -> list[dict]:
    files = sorted((out / "_exports").rglob("train-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def input_with_labels(n: int) -> pa.Table:
    table = make_pairs(n, seed=5)
    return table.append_column("is_positive", pa.array([i % 7 == 0 for i in range(n)]))


@pytest.mark.slow
def test_labeling_killed_mid_scoring_resumes_without_rescoring(ray_local, tiny_model_dir, tmp_path):
    table = input_with_labels(6000)
    write_shards(table, tmp_path / "in", shards=20)
    out = tmp_path / "out"
    flags = ["--label-source", "given", "--hard-negative-min-rank", "1", "--margin", "0"]
    args = [
        "labeling",
        *("--input", str(tmp_path / "in"), "--output", str(out)),
        *("--model", str(tiny_model_dir), "--run-id", "label-resume"),
        *("--batch-rows", "100", "--tokenize-actors", "1", "--num-actors", "1"),
        *("--rows-per-file", "300", *flags),
    ]
    # The scoring stage's progress markers.
    markers = out / "_scored" / "label-resume" / "_staging" / "label-resume" / "_progress"
    kill_when_half_staged(args, markers, table.num_rows, tmp_path / "first-attempt.log")
    assert not (out / "_SUCCESS").exists()

    cfg = local_job(
        tmp_path, tiny_model_dir, run_id="label-resume", batch_rows=100, rows_per_file=300
    )
    mode = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)
    report = run_labeling(cfg, mode)
    manifest = json.loads((out / "_SUCCESS").read_text())
    # Finished shards were not scored again: only what was not staged.
    assert 0 < manifest["rows_resumed"] < table.num_rows
    assert manifest["rows_processed_this_attempt"] < 0.6 * table.num_rows
    assert manifest["rows_resumed"] + manifest["rows_processed_this_attempt"] == table.num_rows
    assert report["rows_resumed"] == manifest["rows_resumed"]
    assert_exactly_once(table, out)
    records = committed_records(out)
    expected = labeled_reference(out, mode)
    assert len(records) == report["exports"]["flagembedding_jsonl"]["rows"] == len(expected) > 0
    assert _same_records(records, expected)
    assert not (out / "_scored").exists()


def _same_records(got: list[dict], want: list[dict]) -> bool:
    """The same records, in any order (several queries share a text in ``make_pairs``)."""
    return sorted(json.dumps(r, sort_keys=True) for r in got) == sorted(
        json.dumps(r, sort_keys=True) for r in want
    )


def test_failed_per_query_step_reruns_without_scoring_again(
    ray_local, tiny_model_dir, tmp_path, monkeypatch
):
    table = input_with_labels(600)
    write_shards(table, tmp_path / "in", shards=3)
    cfg = local_job(tmp_path, tiny_model_dir, run_id="again", batch_rows=100)
    mode = LabelConfig(label_source="given", hard_negative_min_rank=1, margin=0.0)

    def lost(*args, **kwargs):
        raise RuntimeError("the head node went away after scoring")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "_per_query", lost)
        with pytest.raises(RuntimeError, match="went away"):
            run_labeling(cfg, mode)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    report = run_labeling(cfg, mode)
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert manifest["rows_resumed"] == table.num_rows
    assert manifest["rows_processed_this_attempt"] == 0
    assert manifest["rows_scored_by_model"] == table.num_rows
    assert_exactly_once(table, tmp_path / "out")
    assert report["exports"]["flagembedding_jsonl"]["rows"] == len(
        labeled_reference(tmp_path / "out", mode)
    )

"""The whole job on a real local Ray instance with local files."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.json  # noqa: F401
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rerank_ray import JobConfig, run, schema, storage
from rerank_ray.source import InputError
from rerank_ray.storage import StorageError
from tests.conftest import local_job, make_pairs

pytestmark = pytest.mark.integration


def write_shards(table: pa.Table, directory, shards: int = 3):
    directory.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // shards)
    for i in range(shards):
        pq.write_table(table.slice(i * step, step), directory / f"part-{i}.parquet")
    return directory


@pytest.fixture
def run_local(tmp_path, tiny_model_dir):
    """``run_local(table, shards=3, **options)`` writes ``table`` as ``shards`` Parquet files
    in ``tmp_path/in``, runs ``local_job`` with ``options`` on them (the tiny model, output in
    ``tmp_path/out``) and returns the manifest."""

    def run_on_shards(table: pa.Table, shards: int = 3, **options) -> dict:
        write_shards(table, tmp_path / "in", shards)
        return run(local_job(tmp_path, tiny_model_dir, **options))

    return run_on_shards


def with_docs(table: pa.Table, docs: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index("doc"), "doc", pa.array(docs))


def read_output(out_dir):
    scored = pads.dataset(str(out_dir), format="parquet", partitioning="hive").to_table()
    rejects_dir = out_dir / schema.REJECTS_DIR
    rejects = pads.dataset(str(rejects_dir)).to_table() if rejects_dir.exists() else None
    manifest = json.loads((out_dir / schema.MANIFEST_NAME).read_text())
    return scored, rejects, manifest


def keys(table):
    return list(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))


def hf_scores(model_dir, queries, docs):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(queries), 64):
        inputs = tok(queries[i : i + 64], docs[i : i + 64], padding=True, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**inputs).logits.view(-1).numpy())
    return np.concatenate(out)


def test_every_row_exactly_once_with_scores_equal_to_hf(
    ray_local, run_local, tiny_model_dir, tmp_path
):
    table = make_pairs(600)
    bad = pa.table(
        {
            "query_id": ["bad1", "bad2", "bad3"],
            "query": [None, "ok", "ok"],
            "doc_id": ["x1", "x2", "x3"],
            "doc": ["d", "", None],
            "retrieval_rank": [1, 1, 1],
        }
    )
    table = pa.concat_tables([table.slice(0, 300), bad, table.slice(300)])
    manifest = run_local(table, batch_rows=128, run_date="2026-11-21")
    out = tmp_path / "out"
    scored, rejects, written = read_output(out)
    assert written == manifest
    all_keys = keys(scored) + keys(rejects)
    assert len(all_keys) == len(set(all_keys)) == table.num_rows
    assert set(all_keys) == set(keys(table))
    assert manifest["rows_read"] == table.num_rows
    assert manifest["rows_scored"] == scored.num_rows == 600
    assert manifest["rejects_by_reason"] == {"empty_doc": 1, "null_doc": 1, "null_query": 1}
    assert sorted(rejects["reject_reason"].to_pylist()) == ["empty_doc", "null_doc", "null_query"]
    assert set(scored["run_date"].to_pylist()) == {"2026-11-21"}
    assert (out / "run_date=2026-11-21").is_dir()
    # Hashed in a thread while the job runs, joined at commit: the weights' own hash.
    assert manifest["weights_sha256"] == storage.weights_fingerprint(Path(tiny_model_dir))
    # Scores equal HF logits on the same weights, whatever order rows came out in.
    ref = hf_scores(tiny_model_dir, scored["query"].to_pylist(), scored["doc"].to_pylist())
    np.testing.assert_allclose(scored["score"].to_numpy(), ref, atol=1e-4, rtol=0)
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())


def test_truncation_flag_and_extra_partition(ray_local, run_local, tiny_model_dir, tmp_path):
    table = make_pairs(60)
    table = table.append_column("lang", pa.array(["en", "de"] * 30))
    long_doc = " ".join(["paris is the capital and most populous city of france"] * 20)
    docs = table["doc"].to_pylist()
    docs[::3] = [long_doc] * len(docs[::3])
    table = with_docs(table, docs)
    manifest = run_local(
        table,
        shards=2,
        max_length=48,
        partition_by=["run_date", "lang"],
        run_date="2026-01-02",
    )
    out = tmp_path / "out"
    scored, _, _ = read_output(out)
    assert {p.name for p in (out / "run_date=2026-01-02").iterdir()} == {"lang=en", "lang=de"}
    truncated = dict(
        zip(scored["doc_id"].to_pylist(), scored["truncated"].to_pylist(), strict=True)
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {
        d: len(tok(q, doc)["input_ids"]) > 48
        or len(tok(q, add_special_tokens=False)["input_ids"]) > 36
        for d, q, doc in zip(
            table["doc_id"].to_pylist(), table["query"].to_pylist(), docs, strict=True
        )
    }
    assert sum(expected.values()) < len(expected)  # both kinds of rows are present
    assert truncated == expected
    assert manifest["rows_truncated"] == sum(expected.values()) > 0


def test_long_docs_chunk_scores_every_row_once(ray_local, run_local, tiny_model_dir, tmp_path):
    """--long-docs chunk end to end: one row per pair, windows folded; the manifest counts
    the rows; the chunk columns after the job's own; scores as the stages give in-process."""
    from rerank_ray.pairs import Chunking
    from rerank_ray.runners import RunnerOptions
    from rerank_ray.scorer import ScoreStage
    from rerank_ray.tokenize import TokenizeStage

    table = make_pairs(200, seed=7)
    long_doc = " ".join(["paris is the capital and most populous city of france"] * 30)
    docs = table["doc"].to_pylist()
    docs[::4] = [f"{long_doc} {i}" for i in range(len(docs[::4]))]
    docs[5], docs[9] = "", None
    table = with_docs(table, docs)
    manifest = run_local(
        table,
        shards=2,
        max_length=64,
        chunk_overlap=8,
        long_docs="chunk",
        max_chunks_per_doc=4,
        chunk_aggregate="max",
        batch_rows=64,
        run_date="2026-11-21",
    )
    out = tmp_path / "out"
    scored, rejects, _ = read_output(out)
    all_keys = keys(scored) + keys(rejects)
    assert len(all_keys) == len(set(all_keys)) == table.num_rows
    assert manifest["rows_read"] == 200 and manifest["rows_scored"] == scored.num_rows == 198
    assert manifest["rejects_by_reason"] == {"empty_doc": 1, "null_doc": 1}
    assert schema.NUM_CHUNKS not in rejects.column_names
    names = scored.column_names
    assert names[names.index("score") :] == [
        "score", "score_norm", "truncated", "num_chunks", "best_chunk", "run_date"
    ]  # fmt: skip
    assert scored.schema.field("num_chunks").type == pa.int32()
    chunks = dict(zip(scored["doc_id"].to_pylist(), scored["num_chunks"].to_pylist(), strict=True))
    long_ids = set(table["doc_id"].to_pylist()[::4])
    assert {chunks[d] for d in long_ids} == {4} and manifest["rows_truncated"] == len(long_ids)
    assert {chunks[d] for d in chunks if d not in long_ids} == {1, 2}  # up to 8 sample texts
    # The same rows through the stages in-process give the same scores.
    rows = scored.select(["query_id", "query", "doc_id", "doc"])
    tokens = TokenizeStage(str(tiny_model_dir), 64, 48, chunking=Chunking(8, 4))(rows)
    ref = ScoreStage(str(tiny_model_dir), RunnerOptions(device="cpu"), chunk_aggregate="max")(
        tokens
    )
    np.testing.assert_allclose(scored["score"].to_numpy(), ref["score"].to_numpy(), atol=1e-5)
    assert scored["best_chunk"].to_pylist() == ref["best_chunk"].to_pylist()


def test_jsonl_input_with_mapped_columns(ray_local, tiny_model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    rows = make_pairs(50).to_pylist()
    with open(tmp_path / "in" / "pairs.jsonl", "w") as fh:
        for r in rows:
            fh.write(
                json.dumps(
                    {
                        "qid": r["query_id"],
                        "question": r["query"],
                        "pid": r["doc_id"],
                        "passage": r["doc"],
                        "source": "bm25",
                    }
                )
                + "\n"
            )
    run(
        local_job(
            tmp_path,
            tiny_model_dir,
            query_id_column="qid",
            query_column="question",
            doc_id_column="pid",
            doc_column="passage",
            keep_columns=["qid", "pid", "source"],
        )
    )
    scored, _, manifest = read_output(tmp_path / "out")
    assert manifest["rows_scored"] == 50
    assert set(scored.column_names) == {
        "query_id",
        "doc_id",
        "source",
        "score",
        "score_norm",
        "truncated",
        "run_date",
    }
    assert sorted(scored["doc_id"].to_pylist()) == sorted(r["doc_id"] for r in rows)


def test_missing_column_names_column_and_file(tiny_model_dir, tmp_path):
    inp = tmp_path / "in"
    write_shards(make_pairs(20), inp, shards=2)
    pq.write_table(make_pairs(5).drop_columns(["doc"]), inp / "part-9.parquet")
    with pytest.raises(InputError, match=r"part-9\.parquet has no column 'doc'.*--doc-column"):
        run(JobConfig(input=str(inp), output=str(tmp_path / "out"), model=str(tiny_model_dir)))


def test_corrupt_shard_names_the_object(tiny_model_dir, tmp_path):
    inp = write_shards(make_pairs(20), tmp_path / "in", shards=2)
    (inp / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"part-1\.parquet is not a readable Parquet file"):
        run(JobConfig(input=str(inp), output=str(tmp_path / "out"), model=str(tiny_model_dir)))


def test_shards_with_different_column_types_fail_up_front(tiny_model_dir, tmp_path):
    table = make_pairs(20)
    inp = write_shards(table, tmp_path / "in", shards=2)
    ints = table.slice(10, 10)
    ints = ints.set_column(ints.column_names.index("doc_id"), "doc_id", pa.array(range(10)))
    pq.write_table(ints, inp / "part-1.parquet")
    with pytest.raises(InputError, match=r"'doc_id' is int64 in input file .*part-1\.parquet"):
        run(JobConfig(input=str(inp), output=str(tmp_path / "out"), model=str(tiny_model_dir)))


def test_string_and_large_string_shards_are_one_type(tmp_path):
    from rerank_ray.pipeline import s3_settings
    from rerank_ray.source import plan_source

    table = make_pairs(20)
    inp = write_shards(table, tmp_path / "in", shards=2)
    large = table.slice(10, 10)
    large = large.set_column(
        large.column_names.index("doc"), "doc", large["doc"].cast(pa.large_string())
    )
    pq.write_table(large, inp / "part-1.parquet")
    cfg = JobConfig(input=str(inp), output=str(tmp_path / "out"))
    assert plan_source(cfg, s3_settings(cfg)).num_rows == 20


def test_unwritable_output_fails_before_scoring(tiny_model_dir, tmp_path):
    inp = write_shards(make_pairs(20), tmp_path / "in", shards=1)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="is not writable"):
        run(JobConfig(input=str(inp), output=str(blocker / "out"), model=str(tiny_model_dir)))


def test_no_input_files(tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No input files found"):
        run(
            JobConfig(
                input=str(tmp_path / "empty"), output=str(tmp_path / "o"), model=str(tiny_model_dir)
            )
        )


def test_each_shard_reaches_the_pipeline_as_its_own_bundle(ray_local, tmp_path):
    """Ray 2.60's default Parquet reader (V2) handed a small input to the next stage as ONE
    bundle, so one tokenize actor got every row. The job's read gives one per shard."""
    from rerank_ray.pipeline import s3_settings
    from rerank_ray.source import plan_source, read_dataset

    table = make_pairs(4000)
    write_shards(table, tmp_path / "in", shards=8)
    cfg = JobConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    plan = plan_source(cfg, s3_settings(cfg))
    bundles = list(read_dataset(plan, cfg).iter_internal_ref_bundles())
    assert len(bundles) == 8
    assert sorted(b.num_rows() for b in bundles) == [500] * 8


def test_remembered_fast_scoring_grows_the_blocks(ray_local, tiny_model_dir, tmp_path):
    """The rates an earlier run of the model left in the cache decide the block size: none
    remembered, the default; a scoring actor as fast as a MiniLM-size one on an H200, the
    largest blocks (the input is large enough to spread them over the tokenize actor)."""
    import ray

    from rerank_ray import cluster, rates

    cfg = local_job(tmp_path, tiny_model_dir, model_cache_dir=str(tmp_path / "cache"))
    cfg = cfg.with_defaults_resolved()
    assert cluster.plan_pools(cfg, rows=100_000).batch_rows == rates.DEFAULT_BLOCK_ROWS
    key = rates.rates_key(cfg, cluster.device_kind(ray.cluster_resources(), use_gpu=False))
    measured = {"stages": {"score": {"rows_per_busy_s": 72_425.2, "calls": 73}, "tokenize": {"rows_per_busy_s": 3_734.2, "calls": 73}}}  # fmt: skip
    rates.remember_rates(rates.cache_path(cfg), key, measured)
    pools = cluster.plan_pools(cfg, rows=100_000)
    assert pools.measured_rates == rates.StageRates(72_425.2, 3_734.2)
    assert pools.batch_rows == rates.MAX_BLOCK_ROWS
    # ... and stays at what --batch-rows says when it is given
    pinned = cluster.plan_pools(dataclasses.replace(cfg, batch_rows=300), rows=100_000)
    assert pinned.batch_rows == 300


def test_a_large_shard_reaches_the_scorer_a_batch_at_a_time(ray_local, tiny_model_dir, tmp_path):
    """The reader gives a shard as one block and a map stage emits one block per input
    block, so the scorer waited for a whole shard to be tokenized (seen on an H200: the first
    scoring call came ~5 s after the scorer was ready with 50k-row shards). The job splits
    blocks to batch_rows; the sink still writes one file per shard, not one per block."""
    from rerank_ray.pipeline import build_dataset, s3_settings
    from rerank_ray.source import plan_source

    table = make_pairs(3000)
    write_shards(table, tmp_path / "in", shards=1)
    cfg = local_job(tmp_path, tiny_model_dir, batch_rows=500).with_defaults_resolved()
    s3 = s3_settings(cfg)
    scored = build_dataset(cfg, plan_source(cfg, s3), s3)
    sizes = [b.num_rows() for b in scored.iter_internal_ref_bundles()]
    assert sum(sizes) == table.num_rows
    assert max(sizes) <= cfg.batch_rows and len(sizes) >= table.num_rows // cfg.batch_rows

    manifest = run(cfg)
    data_files = [f for f in manifest["files"] if not f.startswith(schema.REJECTS_DIR)]
    assert manifest["rows_scored"] == table.num_rows and len(data_files) == 1


@pytest.mark.slow
def test_stage_traces_account_for_every_row(tiny_model_dir, tmp_path):
    """With RERANK_RAY_TRACE_DIR set, the actors' call traces add up to the input, and each
    actor's set-up line comes before its first call. Runs the CLI in its own process."""
    import os
    import subprocess
    import sys

    table = make_pairs(4000)
    write_shards(table, tmp_path / "in", shards=8)
    trace = tmp_path / "trace"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RERANK_RAY_TRACE_DIR": str(trace)}
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    args += ["--model", str(tiny_model_dir), "--batch-rows", "100", "--tokenize-actors", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "rerank_ray.cli", "run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for stage, actors in (("tokenize", 2), ("score", 1)):
        lines = [
            json.loads(line)
            for file in trace.glob(f"{stage}-*.jsonl")
            for line in file.read_text().splitlines()
        ]
        calls = [r for r in lines if r["stage"] == stage]
        inits = [r for r in lines if r["stage"] == f"{stage}_init"]
        assert sum(c["rows"] for c in calls) == table.num_rows, stage
        assert len(inits) == actors, inits
        for init in inits:
            assert init["start"] <= init["end"]
            own = [c["start"] for c in calls if c["pid"] == init["pid"]]
            assert all(init["end"] <= t for t in own)
            if stage == "score":  # where the scoring actor's set-up went (the bench reads it)
                steps = init["setup_seconds"]
                assert set(steps) == {"load_model", "build_runner", "autotune"}, steps
                assert all(v >= 0 for v in steps.values()), steps
                assert sum(steps.values()) <= init["end"] - init["start"] + 0.05, (steps, init)
                assert init["load_path"] == "transformers"  # on CPU; a GPU reads the checkpoint


def test_jsonl_shards_with_int_and_float_scores_are_accepted(tmp_path):
    from rerank_ray.pipeline import s3_settings
    from rerank_ray.source import plan_source

    inp = tmp_path / "in"
    inp.mkdir()
    for name, score in (("a", 1), ("b", 0.5)):
        rows = [
            {"query_id": "q", "query": "capital", "doc_id": f"{name}{i}", "doc": "paris"}
            | {"retrieval_score": score}
            for i in range(3)
        ]
        (inp / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = JobConfig(input=str(inp), output=str(tmp_path / "out"))
    assert plan_source(cfg, s3_settings(cfg)).num_rows == 6

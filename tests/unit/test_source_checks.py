"""Input and model checks that run before any actor starts (no Ray): JSON lines that are not
UTF-8, input columns named like the job's outputs, shards whose data pages do not decode,
and max_length against the model's positions and the token budget."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rerank_ray import source, storage
from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.source import InputError, plan_source
from rerank_ray.tiny_model import build_tiny_reranker
from tests.conftest import make_pairs

S3 = storage.S3Settings()


def plan(inp: Path, **kw):
    return plan_source(JobConfig(input=str(inp), output=str(inp.parent / "out"), **kw), S3)


def jsonl_lines(n: int) -> list[bytes]:
    return [json.dumps(row).encode() for row in make_pairs(n).to_pylist()]


# --- JSON lines that are not UTF-8 ------------------------------------------------------------


@pytest.mark.parametrize(
    "name, bad_line",
    [
        # Latin-1 text in the document: pyarrow.json parses it without complaint.
        ("pairs.jsonl", b'{"query_id": "q1", "query": "q", "doc_id": "d", "doc": "caf\xe9 ok"}'),
        # The same in a compressed shard: the line number counts decompressed lines.
        ("pairs.jsonl.gz", b'{"query_id": "q1", "query": "q\xff", "doc_id": "d", "doc": "x"}'),
        # In a passthrough column's name.
        ("pairs.jsonl", b'{"query_id": "q1", "query": "q", "doc_id": "d", "doc": "x", "n\xe9": 1}'),
    ],
)
def test_jsonl_bytes_that_are_not_utf8_are_refused_naming_the_file_and_line(
    tmp_path, name, bad_line
):
    lines = jsonl_lines(6)
    lines.insert(3, bad_line)
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / "in" / name
    path.parent.mkdir()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(InputError) as info:
        plan(path.parent)
    message = str(info.value)
    assert str(path) in message
    assert "line 4 " in message and "not UTF-8" in message
    assert "re-encode the file as UTF-8" in message


def test_jsonl_line_longer_than_the_readers_first_block_is_accepted(tmp_path):
    # Ray's reader doubles its block size for such a line; the check does the same.
    rows = make_pairs(4).to_pylist()
    rows[2]["doc"] = "word " * 600_000  # 3 MB: three times pyarrow.json's first block
    path = tmp_path / "in" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plan(path.parent).num_rows == 4


def test_jsonl_that_is_valid_utf8_still_plans(tmp_path):
    path = tmp_path / "in" / "pairs.jsonl"
    path.parent.mkdir()
    rows = make_pairs(5).to_pylist()
    rows[1]["doc"] = "café, Straße, 東京"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert plan(path.parent).num_rows == 5


# --- input columns named like output columns ------------------------------------------------


def write_parquet(table: pa.Table, directory: Path, name: str = "part-0.parquet") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / name)
    return directory / name


@pytest.mark.parametrize(
    "column",
    ["score", "score_norm", "truncated", "reject_reason", "input_ids", "num_tokens"],
)
def test_input_column_named_like_a_job_column_is_refused(tmp_path, column):
    table = make_pairs(10)
    table = table.append_column(column, pa.array([0.5] * 10))
    path = write_parquet(table, tmp_path / "in")
    with pytest.raises(InputError) as info:
        plan(path.parent)
    message = str(info.value)
    assert f"column {column!r}" in message and str(path) in message
    assert "--keep-columns query_id,query,doc_id,doc,retrieval_rank" in message
    assert "rename the column" in message


def test_a_clashing_column_left_out_by_keep_columns_plans(tmp_path):
    table = make_pairs(10).append_column("score", pa.array([0.5] * 10))
    path = write_parquet(table, tmp_path / "in")
    assert plan(path.parent, keep_columns=["query", "doc", "retrieval_rank"]).num_rows == 10
    with pytest.raises(InputError, match="'score'"):
        plan(path.parent, keep_columns=["query", "doc", "score"])


def test_column_named_like_the_canonical_name_of_a_mapped_column_is_refused(tmp_path):
    table = make_pairs(10).append_column("text", pa.array(["other"] * 10))
    path = write_parquet(table, tmp_path / "in")
    with pytest.raises(InputError) as info:
        plan(path.parent, doc_column="text")
    assert "column 'doc'" in str(info.value)
    assert "--doc-column text is renamed to 'doc'" in str(info.value)
    assert plan(path.parent).num_rows == 10  # unmapped, "text" is just passed through


def test_columns_a_mode_adds_are_refused_when_reserved(tmp_path):
    table = make_pairs(10).append_column("rank", pa.array([1] * 10))
    path = write_parquet(table, tmp_path / "in")
    cfg = JobConfig(input=str(path.parent), output=str(tmp_path / "out"))
    assert plan_source(cfg, S3).num_rows == 10
    with pytest.raises(InputError, match="column 'rank'"):
        plan_source(cfg, S3, reserved_columns=("rank", "label"))


def test_a_clash_in_a_later_shard_names_that_shard(tmp_path):
    write_parquet(make_pairs(10), tmp_path / "in", "part-0.parquet")
    later = make_pairs(10, seed=1).append_column("truncated", pa.array([False] * 10))
    path = write_parquet(later, tmp_path / "in", "part-1.parquet")
    with pytest.raises(InputError, match=str(path)):
        plan(tmp_path / "in")


# --- shards whose data pages do not decode --------------------------------------------------


def corrupt_parquet(path: Path, table: pa.Table, where: str, row_group: int = 0) -> None:
    """Write ``table`` uncompressed in two row groups and overwrite 32 bytes of the ``doc``
    column chunk of ``row_group``: at its first page header ("header") or in its middle
    ("middle", the text values). The footer stays intact."""
    pq.write_table(
        table,
        path,
        compression="none",
        use_dictionary=False,
        row_group_size=-(-table.num_rows // 2),
    )
    meta = pq.ParquetFile(path).metadata.row_group(row_group)
    chunk = meta.column(table.schema.get_field_index("doc"))
    offset = chunk.data_page_offset
    if where == "middle":
        offset += chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where, error", [("header", "thrift"), ("middle", "UTF8")])
def test_find_unreadable_shard_names_the_shard_whose_pages_do_not_decode(tmp_path, where, error):
    inp = tmp_path / "in"
    write_parquet(make_pairs(300), inp, "part-0.parquet")
    bad = inp / "part-1.parquet"
    corrupt_parquet(bad, make_pairs(300, seed=1), where)
    write_parquet(make_pairs(300, seed=2), inp, "part-2.parquet")
    assert pq.ParquetFile(bad).metadata.num_rows == 300  # the footer reads
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(bad).validate(full=True)  # and the data does not

    source_plan = plan(inp)  # footers only: the run would start
    assert source_plan.num_rows == 900
    found = source.find_unreadable_shard(source_plan, source_plan.paths)
    assert found is not None
    shown, problem = found
    assert shown == str(bad)
    assert error in problem
    healthy = [p for p in source_plan.paths if p != str(bad)]
    assert source.find_unreadable_shard(source_plan, healthy) is None


def test_find_unreadable_shard_does_not_blame_a_shard_it_cannot_fetch(tmp_path):
    inp = tmp_path / "in"
    gone = write_parquet(make_pairs(20), inp, "part-0.parquet")
    source_plan = plan(inp)
    gone.unlink()  # as a storage outage would: the bytes never arrive
    assert source.find_unreadable_shard(source_plan, source_plan.paths) is None


# --- max_length against the model and the token budget --------------------------------------


def positions_work(model_dir: Path, length: int) -> bool:
    """Whether the HF model's forward takes ``length`` tokens (the ground truth)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = torch.full((1, length), 5)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (IndexError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("fixture, usable", [("tiny_model_dir", 518), ("tiny_bert_dir", 520)])
def test_check_max_length_allows_exactly_the_positions_the_model_has(request, fixture, usable):
    model_dir = request.getfixturevalue(fixture)  # both have max_position_embeddings 520
    assert positions_work(model_dir, usable) and not positions_work(model_dir, usable + 1)
    storage.check_max_length(model_dir, usable)
    with pytest.raises(storage.ModelLoadError) as info:
        storage.check_max_length(model_dir, usable + 1)
    message = str(info.value)
    assert f"max_length {usable + 1} exceeds the model's {usable} usable positions" in message
    assert f"max_position_embeddings 520 in {model_dir / 'config.json'}" in message
    assert f"pass --max-length {usable} or less" in message


def test_a_model_without_max_position_embeddings_is_not_checked(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    del config["max_position_embeddings"]
    (model_copy / "config.json").write_text(json.dumps(config))
    storage.check_max_length(model_copy, 100_000)


def test_token_budget_below_max_length_names_both_and_the_fix():
    with pytest.raises(ConfigError) as info:
        JobConfig(input="in", output="out", max_length=1024, token_budget=1000)
    message = str(info.value)
    assert "(1000)" in message and "(1024)" in message
    assert "--token-budget 1024 or more, or --max-length 1000 or less" in message


def test_cpu_token_budget_grows_to_a_max_length_above_8192(tmp_path):
    from rerank_ray.runners import RunnerOptions
    from rerank_ray.scorer import CPU_TOKEN_BUDGET, ScoreStage

    model_dir = build_tiny_reranker(tmp_path / "long", max_position_embeddings=9002)
    storage.check_max_length(model_dir, 9000)  # 9000 usable positions: allowed
    stage = ScoreStage(str(model_dir), RunnerOptions(device="cpu"), max_length=9000)
    assert CPU_TOKEN_BUDGET < 9000 == stage.budget.value
    assert ScoreStage(str(model_dir), RunnerOptions(device="cpu")).budget.value == CPU_TOKEN_BUDGET
    shutil.rmtree(model_dir)


def chained(outer: Exception, inner: Exception) -> Exception:
    """``outer`` raised from ``inner``, as Ray wraps a UDF's error."""
    try:
        try:
            raise inner
        except type(inner) as err:
            raise outer from err
    except type(outer) as err:
        return err


def test_raise_if_unreadable_reads_shards_only_after_an_error_bad_data_can_cause(tmp_path):
    inp = tmp_path / "in"
    bad = inp / "part-0.parquet"
    inp.mkdir()
    corrupt_parquet(bad, make_pairs(100), "middle")
    source_plan = plan(inp)
    text_error = chained(
        RuntimeError("UDF failed"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x")
    )
    for cause in (OSError("read task failed"), text_error):
        with pytest.raises(InputError, match=f"Input file {bad} has data") as info:
            source.raise_if_unreadable(source_plan, source_plan.paths, "r1", cause)
        assert info.value.__cause__ is cause
        assert "rerun with the same --run-id r1" in str(info.value)
    # An out-of-memory error or a lost actor says nothing about the data: no scan, no blame.
    source.raise_if_unreadable(source_plan, source_plan.paths, "r1", MemoryError("oom"))
    source.raise_if_unreadable(source_plan, source_plan.paths, "r1", RuntimeError("actor died"))

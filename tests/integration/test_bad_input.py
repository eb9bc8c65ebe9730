"""Bad input through the CLI: refused with one message naming the file and the fix, exit 2.

The corrupt-page case runs the job on a real local Ray instance: the footer is intact, so the
up-front check passes and the failure comes from a Ray read task mid-run.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rerank_ray import cli, schema
from tests.conftest import make_pairs
from tests.integration.test_pipeline_local import write_shards
from tests.unit.test_source_checks import corrupt_parquet

pytestmark = pytest.mark.integration


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["run", *args])
    return code, capsys.readouterr().err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "row_group",
    [
        0,  # Ray decodes a shard's first rows while planning the read (read_parquet)
        1,  # a later row group: only the read task meets it, mid-run (write_datasink)
    ],
)
def test_corrupt_data_page_names_the_shard_and_a_rerun_resumes(
    ray_local, tiny_model_dir, tmp_path, capsys, row_group
):
    inp = write_shards(make_pairs(120), tmp_path / "in", shards=1)
    bad = inp / "part-1.parquet"
    corrupt_parquet(bad, make_pairs(120, seed=1), "header", row_group=row_group)
    assert pq.ParquetFile(bad).metadata.num_rows == 120  # the footer reads: the run starts
    out = tmp_path / "out"
    args = ["--input", str(inp), "--output", str(out), "--model", str(tiny_model_dir)]
    args += ["--run-id", "bad-page", "--tokenize-actors", "1", "--num-actors", "1"]
    args += ["--batch-rows", "32", "--run-date", "2026-11-30"]

    code, err = run_cli(capsys, *args)

    assert code == 2
    line = last_line(err)
    assert line.startswith(f"rerank-ray: error: Input file {bad} has data that does not decode")
    assert "thrift" in line
    assert "Replace or remove the shard, then rerun with the same --run-id bad-page" in line
    assert not (out / schema.MANIFEST_NAME).exists()

    # The fix the message gives: replace the shard, rerun with the same run id.
    pq.write_table(make_pairs(120, seed=1), bad)
    code, err = run_cli(capsys, *args)
    assert code == 0, err[-3000:]
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert manifest["rows_read"] == manifest["rows_scored"] == 240


def test_jsonl_that_is_not_utf8_exits_2_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    rows = [json.dumps(r).encode() for r in make_pairs(5).to_pylist()]
    rows[1] = rows[1].replace(b'"doc": "', b'"doc": "caf\xe9 ')
    path = tmp_path / "in" / "pairs.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(rows) + b"\n")
    args = ["--input", str(path.parent), "--output", str(tmp_path / "out")]

    code, err = run_cli(capsys, *args, "--model", str(tiny_model_dir))

    assert code == 2
    assert last_line(err).startswith(
        f"rerank-ray: error: Input file {path} has bytes that are not UTF-8 on line 2 "
    )
    assert "Traceback" not in err


def test_max_length_beyond_the_models_positions_exits_2(tiny_model_dir, tmp_path, capsys):
    write_shards(make_pairs(10), tmp_path / "in", shards=1)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]

    code, err = run_cli(capsys, *args, "--model", str(tiny_model_dir), "--max-length", "520")

    assert code == 2
    assert last_line(err) == (
        "rerank-ray: error: max_length 520 exceeds the model's 518 usable positions "
        f"(max_position_embeddings 520 in {tiny_model_dir / 'config.json'}, minus 2 for the "
        "xlm-roberta position offset): pass --max-length 518 or less."
    )
    assert "Traceback" not in err

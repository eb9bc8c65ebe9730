"""Atomic commit, rerun-replaces, one writer per partition, and resume after a driver kill."""

import threading
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rerank_ray import JobConfig, run, schema
from rerank_ray.sink import ConcurrentRunError, OutputLocation, acquire_lock, release_lock
from rerank_ray.storage import S3Settings
from tests.conftest import kill_when_half_staged, local_job, make_pairs

pytestmark = pytest.mark.integration


def write_shards(directory: Path, shards: int, rows_per_shard: int):
    directory.mkdir(parents=True, exist_ok=True)
    table = make_pairs(shards * rows_per_shard)
    for i in range(shards):
        pq.write_table(
            table.slice(i * rows_per_shard, rows_per_shard), directory / f"s-{i:03d}.parquet"
        )
    return table


def output_keys(out: Path):
    scored = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    return list(zip(scored["query_id"].to_pylist(), scored["doc_id"].to_pylist(), strict=True))


def test_rerun_with_same_run_id_replaces_never_duplicates(ray_local, tiny_model_dir, tmp_path):
    table = write_shards(tmp_path / "in", shards=2, rows_per_shard=100)
    cfg = local_job(tmp_path, tiny_model_dir, run_id="nightly-1")
    first = run(cfg)
    second = run(cfg)
    keys = output_keys(tmp_path / "out")
    assert len(keys) == len(set(keys)) == table.num_rows
    assert not first["replaced_previous_commit"] and second["replaced_previous_commit"]
    on_disk = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.parquet")}
    assert on_disk == set(second["files"])
    assert not set(first["files"]) & on_disk


def test_a_second_run_on_the_same_partition_fails_clearly(ray_local, tiny_model_dir, tmp_path):
    write_shards(tmp_path / "in", shards=1, rows_per_shard=20)
    out = tmp_path / "out"
    other = OutputLocation(str(out), S3Settings(), "other-run")
    lock = other.lock("2026-11-21", ["run_date"])
    acquire_lock(other, lock)
    cfg = JobConfig(
        input=str(tmp_path / "in"),
        output=str(out),
        model=str(tiny_model_dir),
        run_date="2026-11-21",
        run_id="mine",
    )
    with pytest.raises(ConcurrentRunError, match="being written by run other-run"):
        run(cfg)
    assert not (out / schema.MANIFEST_NAME).exists()
    # Another date is another partition: not blocked.
    assert (
        run(
            JobConfig(
                **{**cfg.to_dict(), "run_date": "2026-11-22", "tokenize_actors": 1, "num_actors": 1}
            )
        )["rows_scored"]
        == 20
    )
    release_lock(other, lock)
    assert run(JobConfig(**{**cfg.to_dict(), "tokenize_actors": 1, "num_actors": 1}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_two_racing_runs_gets_the_lock(where, s3_server, bucket, tmp_path):
    output = str(tmp_path / "out") if where == "local" else f"s3://{bucket}/out/"
    s3 = S3Settings.resolve(None, None, True)
    path = OutputLocation(output, s3, "any").lock("2026-11-21", ["run_date"])
    results: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def contender(run_id):
        barrier.wait()
        try:
            acquire_lock(OutputLocation(output, s3, run_id), path)
            results[run_id] = "got"
        except ConcurrentRunError:
            results[run_id] = "refused"

    threads = [threading.Thread(target=contender, args=(r,)) for r in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["got", "refused"]
    winner = next(r for r, got in results.items() if got == "got")
    release_lock(OutputLocation(output, s3, winner), path)


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_local, tiny_model_dir, tmp_path):
    table = write_shards(tmp_path / "in", shards=40, rows_per_shard=500)
    out = tmp_path / "out"
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(out)]
    args += ["--model", str(tiny_model_dir), "--run-id", "resume-me", "--batch-rows", "100"]
    args += ["--tokenize-actors", "1", "--num-actors", "1", "--rows-per-file", "500"]
    markers = out / "_staging" / "resume-me" / "_progress"
    kill_when_half_staged(args, markers, table.num_rows, tmp_path / "first-attempt.log")
    assert not (out / schema.MANIFEST_NAME).exists()

    cfg = local_job(tmp_path, tiny_model_dir, run_id="resume-me", batch_rows=100, rows_per_file=500)
    manifest = run(cfg)
    assert 0 < manifest["rows_resumed"] < table.num_rows
    assert manifest["rows_processed_this_attempt"] < 0.6 * table.num_rows
    assert manifest["rows_resumed"] + manifest["rows_processed_this_attempt"] == table.num_rows
    keys = output_keys(out)
    assert len(keys) == len(set(keys)) == table.num_rows
    expected = set(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))
    assert set(keys) == expected
    print(
        f"resume: {manifest['rows_resumed']} rows kept, "
        f"{manifest['rows_processed_this_attempt']} scored on rerun of {table.num_rows}"
    )

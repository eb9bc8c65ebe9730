"""Failures end clean: a store cut mid-commit leaks nothing, two live attempts of one run id are
refused, and no run leaves marker objects or empty directories behind.

The store is cut by failing ``OutputLocation.move``, the one call the commit moves files with
(on S3 a boto3 copy + delete against moto_server), after a chosen number of moves: the commit,
its journal and its rollback run for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from rerank_ray import JobConfig, run, schema
from rerank_ray.errors import RerankError
from rerank_ray.sink import (
    CommitError,
    ConcurrentRunError,
    OutputLocation,
    acquire_lock,
    release_lock,
)
from rerank_ray.sink import locks as locks_module
from rerank_ray.storage import S3Settings
from tests.conftest import make_pairs, upload_table

pytestmark = pytest.mark.integration

DATE = "2026-11-21"


class StoreCut:
    """Wraps ``OutputLocation.move``: after ``after`` moves into place, every move into place
    fails as an unreachable store would; ``undo_too``: moves back into ``_staging/`` fail too."""

    def __init__(self, after: int, undo_too: bool = False) -> None:
        self.after, self.undo_too = after, undo_too
        self.moved = self.refused = 0
        self.guard = threading.Lock()
        self.real = OutputLocation.move

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(OutputLocation, "move", lambda loc, src, dst: self.move(loc, src, dst))

    def move(self, loc: OutputLocation, src: str, dst: str) -> None:
        back = "/_staging/" in dst
        with self.guard:
            cut = (back and self.undo_too) or (not back and self.moved >= self.after)
            if cut:
                self.refused += 1
            elif not back:
                self.moved += 1
        if cut:
            raise OSError("When connecting to S3: Connection refused (simulated outage)")
        self.real(loc, src, dst)


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def local_entries(root: Path) -> list[str]:
    """Every file and directory below ``root``, relative."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def keys_of(table) -> list[tuple[str, str]]:
    return list(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))


def job(inp: str, out: str, model, run_id: str, **extra) -> JobConfig:
    settings = {"run_date": DATE, "batch_rows": 20, "rows_per_file": 20, **extra}
    return JobConfig(
        input=inp,
        output=out,
        model=str(model),
        run_id=run_id,
        tokenize_actors=1,
        num_actors=1,
        **settings,
    )


def test_s3_cut_mid_commit_leaks_nothing_and_a_rerun_commits_once(
    ray_local, bucket, tiny_model_dir, monkeypatch
):
    table = make_pairs(120)
    for i in range(2):
        upload_table(bucket, f"in/s-{i}.parquet", table.slice(60 * i, 60))
    cfg = job(f"s3://{bucket}/in/", f"s3://{bucket}/out/", tiny_model_dir, "cut")
    cut = StoreCut(after=3)
    cut.install(monkeypatch)
    with pytest.raises(CommitError, match="nothing was committed") as failure:
        run(cfg)
    assert "--run-id cut" in str(failure.value)
    assert cut.moved == 3 and cut.refused >= 1
    # Rolled back: no file outside _staging/ (no data, no _SUCCESS, no lock, no marker).
    assert [k for k in s3_keys(bucket, "out/") if not k.startswith("out/_staging/cut/")] == []

    monkeypatch.undo()
    manifest = run(cfg)
    assert manifest["rows_resumed"] == 120 and manifest["rows_processed_this_attempt"] == 0
    fs = OutputLocation(cfg.output, S3Settings.resolve(None, None, True), "cut").fs
    scored = pads.dataset(f"{bucket}/out", filesystem=fs, partitioning="hive").to_table()
    assert sorted(keys_of(scored)) == sorted(keys_of(table))
    # Exactly the committed files, the manifest and _SUCCESS: no marker object ("out/",
    # "out/_staging/", "out/_locks/"), no staging left.
    expected = {f"out/{f}" for f in manifest["files"]}
    expected |= {"out/_SUCCESS", "out/_manifests/cut.json"}
    assert set(s3_keys(bucket, "out/")) == expected


def test_failed_rollback_is_repaired_by_the_next_run(
    ray_local, tiny_model_dir, tmp_path, monkeypatch
):
    table = make_pairs(100)
    (tmp_path / "in").mkdir()
    for i in range(2):
        pq.write_table(table.slice(50 * i, 50), tmp_path / "in" / f"s-{i}.parquet")
    out = tmp_path / "out"
    cfg = job(str(tmp_path / "in"), str(out), tiny_model_dir, "cut")
    cut = StoreCut(after=2, undo_too=True)
    cut.install(monkeypatch)
    with pytest.raises(CommitError, match="could not be moved back") as failure:
        run(cfg)
    assert "the next run" in str(failure.value)
    leaked = [p for p in out.rglob("*.parquet") if "_staging" not in p.parts]
    assert len(leaked) == 2 and (out / "_staging" / "cut" / "_commit.json").exists()
    assert not (out / schema.MANIFEST_NAME).exists()

    # The store is back. Another run id on another partition repairs before it does anything.
    monkeypatch.undo()
    small = tmp_path / "small"
    small.mkdir()
    pq.write_table(make_pairs(10, seed=1), small / "s.parquet")
    run(job(str(small), str(out), tiny_model_dir, "other", run_date="2026-11-22"))
    assert not (out / f"run_date={DATE}").exists()
    assert not (out / "_staging" / "cut" / "_commit.json").exists()

    manifest = run(cfg)
    assert manifest["rows_resumed"] == 100
    mine = pads.dataset(str(out / f"run_date={DATE}"), format="parquet").to_table()
    assert sorted(keys_of(mine)) == sorted(keys_of(table))
    assert "_staging" not in local_entries(out) and "_locks" not in local_entries(out)


def test_failed_model_check_leaves_nothing(bucket, tiny_model_dir, tmp_path):
    pq.write_table(make_pairs(10), tmp_path / "in.parquet")
    for output in (str(tmp_path / "out"), f"s3://{bucket}/out/"):
        # The tiny model has 518 usable positions: refused after the output's write probe.
        cfg = job(str(tmp_path / "in.parquet"), output, tiny_model_dir, "r", max_length=600)
        with pytest.raises(RerankError, match="600"):
            run(cfg)
    assert local_entries(tmp_path / "out") == []
    assert s3_keys(bucket) == []


HOLDER = """
import sys, time
from rerank_ray.sink import OutputLocation, acquire_lock
from rerank_ray.storage import S3Settings
out = OutputLocation(sys.argv[1], S3Settings(), "same")
acquire_lock(out, out.lock(sys.argv[2], ["run_date"]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_attempt_of_the_same_run_id_is_refused(tiny_model_dir, tmp_path):
    pq.write_table(make_pairs(10), tmp_path / "in.parquet")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), DATE], stdout=subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        second = subprocess.run(
            [
                *(sys.executable, "-m", "rerank_ray.cli", "run"),
                *("--input", str(tmp_path / "in.parquet"), "--output", str(out)),
                *("--model", str(tiny_model_dir), "--run-id", "same", "--run-date", DATE),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert "Run same is already running" in second.stderr
    assert f"pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
    # Its process gone, the dead attempt's lock is taken over at once on the same host.
    mine = OutputLocation(str(out), S3Settings(), "same")
    path = mine.lock(DATE, ["run_date"])
    acquire_lock(mine, path)
    assert json.loads(Path(path).read_text())["pid"] == os.getpid()
    release_lock(mine, path)
    assert not (out / "_locks").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stale_lock_is_taken_over_by_its_run_id_only(where, bucket, tmp_path):
    output = str(tmp_path / "out") if where == "local" else f"s3://{bucket}/out/"
    s3 = S3Settings.resolve(None, None, True)
    mine = OutputLocation(output, s3, "same")
    path = mine.lock(DATE, ["run_date"])
    acquire_lock(mine, path)
    # Alive (fresh heartbeat, this live process): refused, also to the same run id.
    for run_id, match in (("same", "already running"), ("other", "being written by run same")):
        with pytest.raises(ConcurrentRunError, match=match):
            acquire_lock(OutputLocation(output, s3, run_id), path)
    # The holder stops beating (a hung or partitioned host, this process still alive).
    beat = locks_module._held.pop(path)
    beat.stop.set()
    beat.thread.join()
    stale = {**json.loads(_read(mine, path)), "heartbeat_unix": time.time() - 1000}
    with mine.fs.open_output_stream(path) as fh:
        fh.write(json.dumps(stale).encode())
    with pytest.raises(ConcurrentRunError, match="being written by run same"):
        acquire_lock(OutputLocation(output, s3, "other"), path)
    retry = OutputLocation(output, s3, "same")
    acquire_lock(retry, path)
    assert json.loads(_read(mine, path))["token"] != stale["token"]
    release_lock(retry, path)
    assert not mine.exists(path)


def _read(out: OutputLocation, path: str) -> bytes:
    with out.fs.open_input_stream(path) as fh:
        return fh.read()

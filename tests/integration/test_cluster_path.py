"""The cluster path as a new user meets it: a `ray start --head` cluster joined through
RAY_ADDRESS, one that is too small, one that is gone, and one whose workers lack the
driver's S3 endpoint. Each job runs as `rerank-ray run` in its own process, as a user runs it.

Each head is started with `--block` in its own temp dir and stopped by its pid: `ray stop`
would stop every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import _free_port, make_pairs, upload_dir, upload_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
S3_REGION_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")


def _base_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # Workers and driver import this checkout's rerank_ray.
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A stopped test head drains for 30 s by default; it has nothing worth draining.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2",
        "RERANK_RAY_CACHE": str(tmp_path / "cache"),
    }


class Head:
    """A `ray start --head --block` process; ``address`` is its GCS host:port."""

    def __init__(self, tmp_path: Path, num_cpus: int, drop_env: tuple[str, ...] = ()):
        env = _base_env(tmp_path)
        for key in drop_env:
            env.pop(key, None)
        # Short: Ray's Unix socket paths must stay under ~107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--block",
        ]
        self.log_path = tmp_path / f"ray-head-{port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "--block" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("ray start failed: " + self.log_path.read_text()[-2000:])
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def head_factory(tmp_path):
    heads: list[Head] = []

    def start(num_cpus: int, drop_env: tuple[str, ...] = ()) -> Head:
        heads.append(Head(tmp_path, num_cpus, drop_env))
        return heads[-1]

    yield start
    for head in heads:
        head.stop()


def rerank_run(env: dict[str, str], *args: str, timeout: float = 300):
    """`rerank-ray run ARGS` in a fresh process; (CompletedProcess, seconds)."""
    t0 = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "rerank_ray.cli", "run", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.time() - t0


def error_line(stderr: str) -> str:
    """The job's one error line (Ray's own processes may still write after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("rerank-ray: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _local_input(tmp_path: Path, rows: int = 60) -> Path:
    path = tmp_path / "in.parquet"
    pq.write_table(make_pairs(rows), path)
    return path


def test_pools_that_leave_no_cpu_for_reading_fail_fast(head_factory, tmp_path, tiny_model_dir):
    # The reported deadlock: on a 2-CPU cluster, one tokenize and one scoring actor took both
    # CPUs and the read task waited forever (`ReadParquet: 0/1` after 7 minutes).
    head = head_factory(num_cpus=2)
    env = {**_base_env(tmp_path), "RAY_ADDRESS": head.address}
    done, seconds = rerank_run(
        env,
        *("--input", str(_local_input(tmp_path)), "--output", str(tmp_path / "out")),
        *("--model", str(tiny_model_dir), "--tokenize-actors", "1", "--num-actors", "1"),
        timeout=120,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert seconds < 60
    error = error_line(done.stderr)
    assert "needs 3 CPUs" in error and "has 2" in error, error
    assert "ray start --head --num-cpus 4" in error, error
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_stale_cluster_address_file_fails_fast_with_its_path(tmp_path, tiny_model_dir):
    # A dead head's `ray_current_cluster` in Ray's temp dir: ray.init() would retry
    # "Failed to connect to GCS" for minutes in silence.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        record = ray_tmp / "ray" / "ray_current_cluster"
        dead = f"127.0.0.1:{_free_port()}"
        record.write_text(dead)
        env = {**_base_env(tmp_path), "RAY_TMPDIR": str(ray_tmp)}
        env.pop("RAY_ADDRESS", None)
        args = ["--input", str(_local_input(tmp_path)), "--output", str(tmp_path / "out")]
        args += ["--model", str(tiny_model_dir)]
        done, seconds = rerank_run(env, *args, timeout=120)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        assert seconds < 30
        error = error_line(done.stderr)
        assert dead in error and str(record) in error and "delete that file" in error, error

        # RAY_ADDRESS pointing at nothing: named as the source, with its own fix.
        done, seconds = rerank_run({**env, "RAY_ADDRESS": dead}, *args, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert seconds < 30
        error = error_line(done.stderr)
        assert dead in error and "RAY_ADDRESS" in error and "unset RAY_ADDRESS" in error, error
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_driver_s3_endpoint_reaches_workers_of_a_joined_cluster(
    head_factory, s3_server, bucket, tiny_model_dir, tmp_path
):
    # The cluster's workers have credentials but neither the endpoint nor the region: only
    # the driver has them (the moto_server fixture's environment).
    head = head_factory(num_cpus=5, drop_env=S3_ENDPOINT_VARS + S3_REGION_VARS)
    table = make_pairs(120)
    upload_table(bucket, "in/p0.parquet", table.slice(0, 60))
    upload_table(bucket, "in/p1.parquet", table.slice(60))
    model = upload_dir(bucket, "model", tiny_model_dir)
    env = {**_base_env(tmp_path), "RAY_ADDRESS": head.address}
    # No --tokenize-actors: the default pool, autoscaling on this 5-CPU cluster.
    done, _ = rerank_run(
        env,
        *("--input", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/"),
        *("--model", model, "--num-actors", "1", "--batch-rows", "30"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import boto3

    body = boto3.client("s3").get_object(Bucket=bucket, Key="out/_SUCCESS")["Body"].read()
    manifest = json.loads(body)
    assert manifest["rows_read"] == manifest["rows_scored"] == 120
    assert manifest["config"]["s3_endpoint_url"] == s3_server
    assert manifest["config"]["s3_region"] == os.environ["AWS_REGION"]
    assert "actor pools: 1 scoring actor(s), 1-2 (autoscaling) tokenize actor(s)" in done.stderr
    assert f"{manifest['rows_read']} rows read -> 120 scored" in done.stdout

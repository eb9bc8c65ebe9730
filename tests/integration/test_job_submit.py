"""The production path: `ray start --head`, then `ray job submit` of jobs/rerank.py, S3 in/out.

Token authentication stays on (Ray 2.60's default for `ray start`): the cluster writes its
token to ~/.ray/auth_token and `ray job submit` sends it when RAY_AUTH_MODE=token is set.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from tests.conftest import S3_SECRET_KEY, _free_port, make_pairs, upload_dir, upload_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_cluster(s3_server, tmp_path):
    """A real single-node Ray cluster started with `ray start --head --block`.

    `--block` keeps `ray start` in the foreground so that terminating it stops exactly this
    cluster; `ray stop` would kill every Ray process on the machine. The temp dir is short
    because Ray's Unix socket paths must stay under ~107 characters.
    """
    bin_dir = Path(sys.executable).parent
    temp_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RERANK_RAY_CACHE": str(tmp_path / "cache"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=4",
        # Free ports for every agent, so another Ray on this machine cannot collide.
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--block",
    ]
    log = open(tmp_path / "ray-start.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # the dashboard answers (an auth error is still an answer)
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    "ray start failed: " + (tmp_path / "ray-start.log").read_text()[-2000:]
                ) from None
            time.sleep(1)
    try:
        yield {"address": address, "env": env, "bin": bin_dir, "logs": Path(temp_dir)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(cluster, *args, timeout=600):
    cmd = [
        str(cluster["bin"] / "ray"),
        "job",
        "submit",
        "--address",
        cluster["address"],
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/rerank.py",
        *args,
    ]
    for _ in range(30):
        done = subprocess.run(
            cmd, env=cluster["env"], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        # Right after `ray start` the job agent may not be registered yet; Ray says so.
        if "No available agent to submit job" not in done.stderr + done.stdout:
            return done
        time.sleep(2)
    return done


def test_ray_job_submit_s3_end_to_end(ray_cluster, s3_server, bucket, tiny_model_dir):
    table = make_pairs(200)
    upload_table(bucket, "in/p0.parquet", table.slice(0, 100))
    upload_table(bucket, "in/p1.parquet", table.slice(100))
    model = upload_dir(bucket, "model", tiny_model_dir)
    done = submit(
        ray_cluster,
        "--input",
        f"s3://{bucket}/in/",
        "--output",
        f"s3://{bucket}/out/",
        "--model",
        model,
        "--num-actors",
        "1",
        "--tokenize-actors",
        "1",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server.split("://")[1], scheme="http", region="us-east-1"
    )
    scored = pads.dataset(f"{bucket}/out", filesystem=fs, partitioning="hive").to_table()
    assert scored.num_rows == 200
    assert sorted(scored["doc_id"].to_pylist()) == sorted(table["doc_id"].to_pylist())
    manifest = json.loads(
        boto3.client("s3").get_object(Bucket=bucket, Key="out/_SUCCESS")["Body"].read()
    )
    assert manifest["rows_read"] == manifest["rows_scored"] == 200
    # The secret appears in no log file of the cluster nor in the job's output.
    assert S3_SECRET_KEY not in done.stdout + done.stderr
    for path in Path(ray_cluster["logs"]).rglob("*.log"):
        assert S3_SECRET_KEY.encode() not in path.read_bytes(), path


def test_bad_input_path_fails_the_job_with_a_clear_message(ray_cluster, bucket, tiny_model_dir):
    done = submit(
        ray_cluster,
        "--input",
        f"s3://{bucket}/nothing-here/",
        "--output",
        f"s3://{bucket}/out/",
        "--model",
        str(tiny_model_dir),
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "failed" in output.lower()
    assert f"No input files found at s3://{bucket}/nothing-here/" in output

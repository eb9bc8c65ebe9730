"""Shared fixtures: tiny real models, a real S3 server (moto_server), a local Ray instance.

Fixtures that start servers are session-scoped; each test gets its own bucket or directory.
The S3 credentials below are fake but distinctive, so tests can grep logs for the secret.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from rerank_ray.tiny_model import SAMPLE_TEXTS, build_tiny_reranker

S3_ACCESS_KEY = "AKIARERANKRAYTEST0001"
S3_SECRET_KEY = "rr-secret-9f8e7d6c5b4a39281716-DO-NOT-LOG"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer XLM-RoBERTa cross-encoder (bge-reranker-v2-m3's architecture), safetensors."""
    return build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-xlmr")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT cross-encoder (uses token_type_ids)."""
    return build_tiny_reranker(tmp_path_factory.mktemp("models") / "tiny-bert", kind="bert")


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may modify."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def make_pairs(n: int, seed: int = 0, queries: int | None = None) -> pa.Table:
    """``n`` synthetic pairs with unique (query_id, doc_id) and varied lengths."""
    import random

    rng = random.Random(seed)
    nq = queries or max(1, n // 10)
    rows = {"query_id": [], "query": [], "doc_id": [], "doc": [], "retrieval_rank": []}
    for i in range(n):
        q = i % nq
        rows["query_id"].append(f"q{q}")
        rows["query"].append(SAMPLE_TEXTS[q % len(SAMPLE_TEXTS)])
        rows["doc_id"].append(f"d{i}")
        rows["doc"].append(" ".join(rng.choice(SAMPLE_TEXTS) for _ in range(rng.randint(1, 8))))
        rows["retrieval_rank"].append(i // nq + 1)
    return pa.table(rows)


def local_job(tmp_path: Path, model_dir, **options):
    """The job from ``tmp_path/in`` to ``tmp_path/out`` with one tokenize and one scoring
    actor; ``options`` set the other fields."""
    from rerank_ray import JobConfig

    return JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / "out"),
        model=str(model_dir),
        tokenize_actors=1,
        num_actors=1,
        **options,
    )


def kill_when_half_staged(cli_args: list[str], markers: Path, rows: int, log: Path) -> None:
    """Run ``rerank_ray.cli`` with ``cli_args`` in its own process (output to ``log``) and,
    once the progress markers in ``markers`` count half of ``rows`` staged, kill it and the
    Ray instance it started (raylet, GCS, workers: its descendants) at once, as a lost head
    node would: nothing gets to finish its write."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rerank_ray.cli", *cli_args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        staged, deadline = 0, time.time() + 600
        while staged < 0.5 * rows:
            assert proc.poll() is None, "the first attempt ended before it could be killed"
            assert time.time() < deadline, "the first attempt made no progress"
            time.sleep(0.1)
            staged = 0
            for marker in markers.glob("*.json"):
                with contextlib.suppress(ValueError):  # being written
                    staged += sum(
                        e["scored"] + e["rejected"] + e["filtered"]
                        for e in json.loads(marker.read_text())
                    )
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(signal.SIGKILL)
        proc.wait()


def moto_server_exe() -> str:
    """The moto_server of this interpreter's environment (not another one on PATH)."""
    local = Path(sys.executable).parent / "moto_server"
    return str(local) if local.exists() else (shutil.which("moto_server") or "moto_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-protocol server (moto_server) on 127.0.0.1; AWS env points at it."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto_server.log", "w")  # noqa: SIM115
    exe = moto_server_exe()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the S3 test server."""
    import boto3

    name = f"rr-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """A real local Ray instance, started after the S3 env so workers inherit it."""
    import ray

    os.environ["RERANK_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def upload_table(bucket: str, key: str, table: pa.Table) -> str:
    """Write ``table`` as Parquet to s3://bucket/key through boto3; return the URI."""
    import io

    import boto3
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    return f"s3://{bucket}/{key}"


def upload_dir(bucket: str, prefix: str, local: Path) -> str:
    import boto3

    client = boto3.client("s3")
    for path in Path(local).iterdir():
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}/"

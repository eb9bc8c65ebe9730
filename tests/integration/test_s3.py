"""The job against a real S3-protocol server (moto_server on 127.0.0.1)."""

import json
import os
import subprocess
import time
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from rerank_ray import JobConfig, run
from rerank_ray.source import InputError
from rerank_ray.storage import StorageError
from tests.conftest import (
    S3_SECRET_KEY,
    _free_port,
    make_pairs,
    moto_server_exe,
    upload_dir,
    upload_table,
)

pytestmark = pytest.mark.integration


def s3fs(endpoint):
    return pafs.S3FileSystem(
        endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1"
    )


def test_s3_in_s3_out_with_model_from_s3(ray_local, s3_server, bucket, tiny_model_dir, capsys):
    table = make_pairs(300)
    upload_table(bucket, "pairs/a.parquet", table.slice(0, 150))
    upload_table(bucket, "pairs/b.parquet", table.slice(150))
    model_uri = upload_dir(bucket, "models/tiny", tiny_model_dir)
    manifest = run(
        JobConfig(
            input=f"s3://{bucket}/pairs/",
            output=f"s3://{bucket}/scores/",
            model=model_uri,
            tokenize_actors=1,
            num_actors=1,
            run_date="2026-11-21",
        )
    )
    fs = s3fs(s3_server)
    scored = pads.dataset(f"{bucket}/scores", filesystem=fs, partitioning="hive").to_table()
    assert scored.num_rows == manifest["rows_scored"] == 300
    got = set(zip(scored["query_id"].to_pylist(), scored["doc_id"].to_pylist(), strict=True))
    assert got == set(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))
    body = boto3.client("s3").get_object(Bucket=bucket, Key="scores/_SUCCESS")["Body"].read()
    written = json.loads(body)
    assert written["run_id"] == manifest["run_id"] and written["model"] == model_uri
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    # Nothing staged is left behind (pyarrow may keep an empty "_staging/" marker).
    assert not [k for k in keys if "_staging/" in k and not k.endswith("_staging/")]
    assert [k for k in keys if k.startswith("scores/run_date=2026-11-21/")]
    # The secret never reaches the manifest, the console, or any Ray log of the session.
    assert S3_SECRET_KEY not in body.decode()
    out = capsys.readouterr()
    assert S3_SECRET_KEY not in out.out + out.err
    session_dir = Path(ray_local._private.worker._global_node.get_session_dir_path())
    for path in session_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert S3_SECRET_KEY.encode() not in path.read_bytes(), path


def test_nonexistent_bucket_fails_fast(s3_server, tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="s3://no-such-bucket-rr/pairs/") as err:
        run(
            JobConfig(
                input="s3://no-such-bucket-rr/pairs/",
                output=str(tmp_path / "o"),
                model=str(tiny_model_dir),
            )
        )
    assert "bucket" in str(err.value).lower() or "no input files" in str(err.value).lower()


def test_unwritable_output_bucket_fails_before_scoring(s3_server, bucket, tiny_model_dir):
    upload_table(bucket, "pairs/a.parquet", make_pairs(10))
    with pytest.raises(StorageError, match=r"Output s3://missing-out-bucket/x/ is not writable"):
        run(
            JobConfig(
                input=f"s3://{bucket}/pairs/",
                output="s3://missing-out-bucket/x/",
                model=str(tiny_model_dir),
            )
        )


def test_corrupt_object_is_named(s3_server, bucket, tiny_model_dir):
    upload_table(bucket, "pairs/good.parquet", make_pairs(10))
    boto3.client("s3").put_object(Bucket=bucket, Key="pairs/broken.parquet", Body=b"garbage")
    with pytest.raises(InputError, match=rf"s3://{bucket}/pairs/broken\.parquet is not a readable"):
        run(
            JobConfig(
                input=f"s3://{bucket}/pairs/",
                output=f"s3://{bucket}/out/",
                model=str(tiny_model_dir),
            )
        )


@pytest.fixture
def auth_s3_server():
    """A second moto_server that checks credentials (IAM auth on from the first request)."""
    port = _free_port()
    exe = moto_server_exe()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


def test_bad_credentials_fail_fast_without_leaking_the_secret(
    s3_server, auth_s3_server, tiny_model_dir, tmp_path
):
    cfg = JobConfig(
        input="s3://any-bucket/pairs/",
        output=str(tmp_path / "o"),
        model=str(tiny_model_dir),
        s3_endpoint_url=auth_s3_server,
    )
    with pytest.raises(InputError) as err:
        run(cfg)
    message = str(err.value)
    assert "credentials" in message.lower()
    assert S3_SECRET_KEY not in message
    assert S3_SECRET_KEY not in json.dumps(cfg.to_dict())

"""Faults mid-run: the run completes with every input row exactly once, or fails clearly with
nothing committed.

- A scoring actor's process is killed (SIGKILL, as a CUDA crash or the OOM killer would).
  Ray Data 2.60 creates map actors with ``max_restarts=-1`` and ``max_task_retries=-1``
  (``ActorPoolMapOperator``), so the actor restarts and its in-flight batch is retried.
- A worker node hosting a scoring actor is removed (a reclaimed spot node): the run still
  completes exactly once, the lost work redone on the remaining nodes (a spare GPU node
  stands in for the autoscaler's replacement).
- S3 answers ``503 SlowDown`` during the read or the write: pyarrow's S3 retry strategy
  (``storage.S3Settings``: standard, 8 attempts) absorbs it. If S3 stays down the run fails,
  and neither ``_SUCCESS`` nor any file outside ``_staging/`` appears (only the run's lock
  object, which a store that is down cannot delete).

The S3 faults come from a real HTTP proxy in front of moto_server that answers ``503 SlowDown``
(S3's throttling error) to chosen requests.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import boto3
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from rerank_ray import JobConfig, run
from tests.conftest import make_pairs, upload_table
from tests.integration.test_multinode import (
    assert_exactly_once,
    run_scenario,
    write_shards,
)

pytestmark = pytest.mark.integration

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message>"
    b"<RequestId>rerank-ray-fault-proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    """An HTTP proxy to an S3 server that answers 503 SlowDown to chosen requests.

    ``fail_every``: the first attempt of every n-th distinct matching request fails (a retry
    of the same request goes through), so transient throttling is exercised deterministically.
    ``down``: every request fails from now on (the endpoint is out for good).
    ``match(method, path)`` picks the requests subject to faults.
    """

    def __init__(self, upstream: str, match, fail_every: int = 0) -> None:
        self.upstream = urlparse(upstream)
        self.match = match
        self.fail_every = fail_every
        self.down = False
        self.lock = threading.Lock()
        self.seen = 0
        self.failed: set[tuple[str, str, str]] = set()
        self.served_503 = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep the test output readable
                pass

            def handle_one(self) -> None:
                body = self._read_body()
                if proxy.should_fail(self.command, self.path, self.headers.get("Range", "")):
                    self._reply(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        conn.putheader(key, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                conn.close()
                with proxy.lock:
                    proxy.forwarded += 1
                self._reply(resp.status, headers, data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers, data: bytes) -> None:
                self.send_response(status)
                has_length = False
                for key, value in headers:
                    if key.lower() == "content-length":
                        has_length = True
                        if self.command != "HEAD":
                            value = str(len(data))
                    if key.lower() not in ("server", "date"):
                        self.send_header(key, value)
                if not has_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def should_fail(self, method: str, path: str, range_: str) -> bool:
        with self.lock:
            if self.down:
                self.served_503 += 1
                return True
            if not self.fail_every or not self.match(method, path):
                return False
            key = (method, path, range_)
            if key in self.failed:
                return False  # the retry of a failed request goes through
            self.seen += 1
            if self.seen % self.fail_every:
                return False
            self.failed.add(key)
            self.served_503 += 1
            return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def moto_fs(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1"
    )


def s3_keys(bucket: str, prefix: str) -> list[str]:
    pages = (
        boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_output_keys_exactly_once(table, bucket: str, endpoint: str) -> None:
    fs = moto_fs(endpoint)
    scored = pads.dataset(f"{bucket}/out", filesystem=fs, partitioning="hive").to_table()
    got = list(zip(scored["query_id"].to_pylist(), scored["doc_id"].to_pylist(), strict=True))
    want = list(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))
    assert len(got) == len(want)
    assert sorted(got) == sorted(want)
    assert "out/_SUCCESS" in s3_keys(bucket, "out/")
    assert not [k for k in s3_keys(bucket, "out/_staging/") if k.endswith(".parquet")]


def s3_run(bucket: str, proxy: FaultProxy, model) -> dict:
    return run(
        JobConfig(
            input=f"s3://{bucket}/in/",
            output=f"s3://{bucket}/out/",
            model=str(model),
            s3_endpoint_url=proxy.url,
            batch_rows=100,
            tokenize_actors=1,
            num_actors=1,
            run_date="2026-11-21",
        )
    )


def upload_shards(bucket: str, table, shards: int = 4) -> None:
    step = -(-table.num_rows // shards)
    for i in range(shards):
        upload_table(bucket, f"in/part-{i}.parquet", table.slice(i * step, step))


@pytest.mark.slow
@pytest.mark.parametrize(
    "phase, match",
    [
        ("read", lambda method, path: method == "GET" and "/in/" in path),
        ("write", lambda method, path: method in ("PUT", "POST", "DELETE") and "/out/" in path),
    ],
)
def test_s3_slowdown_is_absorbed_exactly_once(
    phase, match, ray_local, s3_server, bucket, tiny_model_dir
):
    table = make_pairs(800)
    upload_shards(bucket, table)
    proxy = FaultProxy(s3_server, match, fail_every=2)
    try:
        manifest = s3_run(bucket, proxy, tiny_model_dir)
    finally:
        proxy.close()
    assert proxy.served_503 >= 2, f"no fault was injected during the {phase}"
    assert manifest["rows_read"] == manifest["rows_scored"] == 800
    s3_output_keys_exactly_once(table, bucket, s3_server)


@pytest.mark.slow
def test_s3_down_for_good_during_write_fails_with_nothing_committed(
    ray_local, s3_server, bucket, tiny_model_dir
):
    table = make_pairs(400)
    upload_shards(bucket, table)

    class DownAtFirstDataWrite:
        """S3 goes down at the first write of a data file (after the up-front checks)."""

        def __call__(self, method: str, path: str) -> bool:
            if method in ("PUT", "POST") and "/out/_staging/" in path and "probe" not in path:
                proxy.down = True
            return proxy.down

    proxy = FaultProxy(s3_server, DownAtFirstDataWrite(), fail_every=1)
    started = time.time()
    try:
        with pytest.raises(Exception) as failure:
            s3_run(bucket, proxy, tiny_model_dir)
    finally:
        proxy.close()
    assert proxy.down, "the outage never started: no data write was seen"
    message = str(failure.value)
    assert "SLOW_DOWN" in message or "SlowDown" in message or "503" in message, message
    keys = s3_keys(bucket, "out/")
    assert "out/_SUCCESS" not in keys
    # The store is still down when the run releases its lock, so the lock object stays (its
    # heartbeat stopped: it goes stale and names the run to resume); that it exists shows the
    # outage began after the up-front checks. Nothing else: no data file, no marker object.
    lock = "out/_locks/run_date=2026-11-21.lock"
    assert [k for k in keys if not k.startswith("out/_staging/")] == [lock]
    assert time.time() - started < 600


def scenario(tmp_path, tiny_model_dir, table, **extra) -> dict:
    inp = write_shards(table, tmp_path / "in", shards=8)
    return {
        "input": str(inp),
        "output": str(tmp_path / "out"),
        "model": str(tiny_model_dir),
        "batch_rows": 50,
        "result": str(tmp_path / "result.json"),
        **extra,
    }


@pytest.mark.slow
def test_killed_scoring_actor_mid_run_every_row_once(tiny_model_dir, tmp_path):
    table = make_pairs(10000)
    result = run_scenario(
        scenario(tmp_path, tiny_model_dir, table, gpu_nodes=2, kill_scorer_after_s=1.0)
    )
    assert "error" not in result, result["error"]
    assert result.get("killed_while_running"), result
    assert result["scorer_restarts"] >= 1, result
    assert result["manifest"] == {"rows_read": 10000, "rows_scored": 10000}
    assert_exactly_once(table, tmp_path / "out")


def remove_a_node_mid_run(tiny_model_dir, tmp_path, gpu_nodes: int, check) -> None:
    """Two scoring actors on ``gpu_nodes`` GPU nodes; one node is removed mid-run. ``check``
    gets the scenario result before the every-row-once checks."""
    table = make_pairs(10000)
    result = run_scenario(
        scenario(tmp_path, tiny_model_dir, table, gpu_nodes=gpu_nodes, remove_node_after_s=1.0)
    )
    assert "error" not in result, result["error"]
    assert result.get("removed_while_running"), result
    check(result)
    assert result["manifest"] == {"rows_read": 10000, "rows_scored": 10000}
    assert_exactly_once(table, tmp_path / "out")


@pytest.mark.slow
def test_worker_node_removed_mid_run_every_row_once(tiny_model_dir, tmp_path):
    # Three GPU nodes for two scoring actors: a spare GPU for the lost node's actor to restart
    # on, as a replacement node from the autoscaler would give.
    def removed_a_scoring_node(result):
        nodes = {n for per_actor in result["scorer_nodes"].values() for n in per_actor}
        assert result["removed_node"] in nodes, result

    remove_a_node_mid_run(tiny_model_dir, tmp_path, 3, removed_a_scoring_node)


@pytest.mark.slow
def test_worker_node_removed_without_a_spare_gpu_every_row_once(tiny_model_dir, tmp_path):
    # Two GPU nodes for two scoring actors: when one node goes, no GPU is free for its actor
    # (a cluster at its max_workers). The job must still finish on what is left.
    def one_node_left(result):
        survivors = set(result["worker_nodes"]) - {result["removed_node"]}
        assert len(survivors) == 1

    remove_a_node_mid_run(tiny_model_dir, tmp_path, 2, one_node_left)

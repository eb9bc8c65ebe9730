"""The job on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

The cluster has a CPU head (the driver, tokenizer, read/write tasks) and worker nodes that
each advertise one GPU, as cloud GPU nodes do. With GPUs in the cluster the pipeline gives each
scoring actor ``num_gpus=1``, so Ray must place the actors on different nodes; the scorer
itself falls back to the CPU because torch finds no CUDA device. Which node each scoring
actor ran on is read from the GCS actor table while the job runs.

Each scenario runs in its own Python process (this file run as a script): a driver connects to
one Ray cluster per process, and the test session may already hold ``ray_local``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_pairs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SCORER_CLASS = "ScoreOnNode"  # the scoring stage's actor class, as Ray names it


def write_shards(table: pa.Table, directory: Path, shards: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    step = -(-table.num_rows // shards)
    for i in range(shards):
        pq.write_table(table.slice(i * step, step), directory / f"part-{i}.parquet")
    return directory


def committed_keys(out_dir: Path) -> list[tuple[str, str]]:
    """(query_id, doc_id) of every committed row: scored rows plus ``_rejects/``."""
    tables = [pads.dataset(str(out_dir), format="parquet", partitioning="hive").to_table()]
    rejects = out_dir / "_rejects"
    if rejects.exists():
        tables.append(pads.dataset(str(rejects)).to_table())
    return [
        key
        for t in tables
        for key in zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(), strict=True)
    ]


def assert_exactly_once(table: pa.Table, out_dir: Path) -> None:
    got = committed_keys(out_dir)
    want = list(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist(), strict=True))
    assert len(got) == len(want), f"{len(got)} rows out for {len(want)} in"
    assert sorted(got) == sorted(want)
    assert (out_dir / "_SUCCESS").exists()
    assert not list((out_dir / "_staging").rglob("*.parquet"))


def scorer_actors() -> list[dict]:
    """Scoring actors from the GCS actor table (works without the dashboard/state API)."""
    import ray

    return [a for a in ray._private.state.actors().values() if SCORER_CLASS in a["ActorClassName"]]


def run_scenario(scenario: dict, timeout: float = 480) -> dict:
    """Run this file as a script with ``scenario``; return the JSON result it writes."""
    result = Path(scenario["result"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, __file__, json.dumps(scenario)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.exists(), f"scenario crashed (rc {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(result.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario_main(scenario: dict) -> None:
    """In a fresh process: a Cluster, the job, and (if asked) a fault injected mid-run: a
    worker node hosting a scoring actor removed, or a scoring actor's process killed."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from rerank_ray import JobConfig, run

    # Cluster records its address in /tmp/ray/ray_current_cluster, where any other `ray.init()`
    # on this machine (other people's tests) would find and join it. This driver connects by
    # address, so the record is not written.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "gcs_server_port": _free_port(),
            "include_dashboard": False,
            "object_store_memory": 200 * 1024**2,
        },
    )
    workers = [
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 1024**2)
        for _ in range(scenario["gpu_nodes"])
    ]
    cluster.wait_for_nodes()
    cluster.connect()
    # Small blocks, so the tokenizer's output reaches the scoring pool as many bundles and
    # every scoring actor gets work (a small input is otherwise read as one block).
    ctx = DataContext.get_current()
    ctx.target_max_block_size = 64 * 1024
    # Dispatch no work until every pool actor is up. Ray Data otherwise starts actors
    # asynchronously, and on a loaded 2-core machine the first scoring actor can finish this
    # small input before the second one has imported torch (seen in CI: one actor, one node).
    ctx.wait_for_min_actors_s = 240
    result: dict = {"scorer_nodes": {}, "worker_nodes": [w.node_id for w in workers]}
    stop = threading.Event()
    finished = threading.Event()

    def watch() -> None:
        removed = False
        while not stop.is_set():
            alive = [a for a in scorer_actors() if a["State"] == "ALIVE"]
            for a in alive:
                result["scorer_nodes"].setdefault(a["ActorID"], set()).add(a["Address"]["NodeID"])
            remove_after = scenario.get("remove_node_after_s")
            if remove_after is not None and not removed and len(alive) >= 2:
                time.sleep(remove_after)
                victim_id = alive[0]["Address"]["NodeID"]
                victim = next(w for w in workers if w.node_id == victim_id)
                result["removed_node"] = victim_id
                result["removed_while_running"] = not finished.is_set()
                cluster.remove_node(victim, allow_graceful=False)
                removed = True
            kill_after = scenario.get("kill_scorer_after_s")
            if kill_after is not None and not removed and len(alive) >= 2:
                time.sleep(kill_after)
                result["killed_while_running"] = not finished.is_set()
                os.kill(alive[0]["Pid"], signal.SIGKILL)
                removed = True
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        manifest = run(
            JobConfig(
                input=scenario["input"],
                output=scenario["output"],
                model=scenario["model"],
                batch_rows=scenario["batch_rows"],
                tokenize_actors=1,
                num_actors=2,
                run_date="2026-11-21",
            )
        )
        result["manifest"] = {k: manifest[k] for k in ("rows_read", "rows_scored")}
    except Exception as err:  # reported to the test, which decides
        result["error"] = f"{type(err).__name__}: {err}"
    finished.set()
    stop.set()
    watcher.join()
    result["scorer_restarts"] = sum(a["NumRestarts"] for a in scorer_actors())
    result["scorer_nodes"] = {k: sorted(v) for k, v in result["scorer_nodes"].items()}
    ray.shutdown()
    cluster.shutdown()
    Path(scenario["result"]).write_text(json.dumps(result))


@pytest.mark.slow
def test_scoring_actors_spread_over_nodes_every_row_once(tiny_model_dir, tmp_path):
    table = make_pairs(1500)
    inp = write_shards(table, tmp_path / "in", shards=6)
    out = tmp_path / "out"
    result = run_scenario(
        {
            "input": str(inp),
            "output": str(out),
            "model": str(tiny_model_dir),
            "batch_rows": 100,
            "gpu_nodes": 2,
            "result": str(tmp_path / "result.json"),
        }
    )
    assert "error" not in result, result["error"]
    assert result["manifest"] == {"rows_read": 1500, "rows_scored": 1500}
    nodes = {n for per_actor in result["scorer_nodes"].values() for n in per_actor}
    assert len(nodes) >= 2, result
    assert nodes <= set(result["worker_nodes"])  # the GPU nodes, never the head
    assert_exactly_once(table, out)


if __name__ == "__main__":
    _scenario_main(json.loads(sys.argv[1]))

"""Load run on CPU: >= 1,000,000 pairs through the whole pipeline with the tiny model.

Generates Parquet shards locally, runs ``rerank_ray.run`` on a local Ray instance started
here, reads the output back, and records what bounds memory: peak RSS of the driver and of
every Ray process (sampled with psutil while the job runs) and object-store spilling (Ray's
own memory summary, plus the size of the spill directory). Writes one JSON file:

    .venv/bin/python bench/load_cpu.py --rows 1000000 --out bench/results/load_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from rerank_ray import JobConfig, run
from rerank_ray.tiny_model import SAMPLE_TEXTS, build_tiny_reranker

GIB = 1024**3
MIB = 1024**2


def write_shards(
    directory: Path, rows: int, shards: int, seed: int = 0, positives: bool = False
) -> None:
    """``rows`` pairs with unique (query_id, doc_id), 10 docs per query, 1-8 sentences a doc;
    with ``positives``, an ``is_positive`` column marking each query's first doc (so the
    labeling mode's exports have content with any model)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_shard = -(-rows // shards)
    for s in range(shards):
        start, stop = s * per_shard, min(rows, (s + 1) * per_shard)
        ids = range(start, stop)
        queries = [i // 10 for i in ids]
        table = pa.table(
            {
                "query_id": [f"q{q}" for q in queries],
                "query": [SAMPLE_TEXTS[q % len(SAMPLE_TEXTS)] for q in queries],
                "doc_id": [f"d{i}" for i in ids],
                "doc": [" ".join(rng.choices(SAMPLE_TEXTS, k=rng.randint(1, 8))) for _ in ids],
                "retrieval_rank": [i % 10 + 1 for i in ids],
            }
        )
        if positives:
            table = table.append_column("is_positive", pa.array([i % 10 == 0 for i in ids]))
        pq.write_table(table, directory / f"part-{s:04d}.parquet")


class RssSampler(threading.Thread):
    """Samples the RSS of this process and of all its descendants (the local Ray instance),
    and the size of Ray's spill directories."""

    def __init__(self, spill_root: Path, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.spill_root = spill_root
        self.interval_s = interval_s
        self.spill_peak = 0  # bytes in Ray's spill directories (ray_spilled_objects_<node>)
        self.stop_event = threading.Event()
        self.driver_peak = 0
        self.ray_total_peak = 0  # all Ray processes together (GCS, raylet, workers, ...)
        self.worker_peak = 0  # the largest single Ray worker process
        self.worker_peak_name = ""
        self.samples = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop_event.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            total = 0
            for child in me.children(recursive=True):
                try:
                    rss = child.memory_info().rss
                    name = " ".join(child.cmdline()[:1])
                except psutil.Error:
                    continue
                total += rss
                if name.startswith("ray::") and rss > self.worker_peak:
                    self.worker_peak, self.worker_peak_name = rss, name
            self.ray_total_peak = max(self.ray_total_peak, total)
            spilled = sum(dir_size(d) for d in self.spill_root.rglob("ray_spilled_objects_*"))
            self.spill_peak = max(self.spill_peak, spilled)
            self.samples += 1
            self.stop_event.wait(self.interval_s)


def spilled_from_summary(summary: str) -> dict:
    """Parse the cumulative spill line of Ray's memory summary (``ray memory --stats-only``)."""
    match = re.search(r"Spilled (\d+) MiB, (\d+) objects", summary)
    restored = re.search(r"Restored (\d+) MiB, (\d+) objects", summary)
    return {
        "spilled_mib": int(match.group(1)) if match else 0,
        "spilled_objects": int(match.group(2)) if match else 0,
        "restored_mib": int(restored.group(1)) if restored else 0,
        "restored_objects": int(restored.group(2)) if restored else 0,
    }


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def device() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "gpu": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--batch-rows", type=int, default=2048)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--tokenize-actors", type=int, default=1)
    parser.add_argument("--num-cpus", type=int, default=4)
    parser.add_argument("--object-store-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import ray
    import ray._private.internal_api as internal_api

    work = Path(tempfile.mkdtemp(prefix="rr-load-", dir="/tmp"))
    try:
        t = time.time()
        write_shards(work / "in", args.rows, args.shards)
        gen_s = time.time() - t
        model = build_tiny_reranker(work / "model")
        ray.init(
            num_cpus=args.num_cpus,
            object_store_memory=int(args.object_store_gib * GIB),
            include_dashboard=False,
            _temp_dir=str(work / "ray"),
        )
        sampler = RssSampler(work / "ray")
        sampler.start()
        t0 = time.time()
        manifest = run(
            JobConfig(
                input=str(work / "in"),
                output=str(work / "out"),
                model=str(model),
                batch_rows=args.batch_rows,
                num_actors=args.num_actors,
                tokenize_actors=args.tokenize_actors,
                device="cpu",
                run_id="load-cpu",
            )
        )
        wall = time.time() - t0
        sampler.stop_event.set()
        sampler.join()
        summary = internal_api.memory_summary(
            address=ray.get_runtime_context().gcs_address, stats_only=True
        )
        ray.shutdown()

        t = time.time()
        out = pads.dataset(str(work / "out"), format="parquet", partitioning="hive")
        keys = out.to_table(columns=["query_id", "doc_id"])
        rows_out = keys.num_rows
        unique = len(
            set(zip(keys["query_id"].to_pylist(), keys["doc_id"].to_pylist(), strict=True))
        )
        readback_s = time.time() - t
        result = {
            "date": dt.date.today().isoformat(),
            "device": device(),
            "ray_version": ray.__version__,
            "settings": {
                "rows": args.rows,
                "shards": args.shards,
                "batch_rows": args.batch_rows,
                "num_actors": args.num_actors,
                "tokenize_actors": args.tokenize_actors,
                "ray_num_cpus": args.num_cpus,
                "object_store_memory_gib": args.object_store_gib,
                "model": "rerank_ray.tiny_model.build_tiny_reranker (2-layer XLM-R, random)",
            },
            "rows_in": args.rows,
            "rows_out_read_back": rows_out,
            "unique_pairs_out": unique,
            "rows_in_equals_rows_out": rows_out == unique == args.rows,
            "manifest_rows": {
                k: manifest[k] for k in ("rows_read", "rows_scored", "rows_rejected")
            },
            "output_files": len(manifest["files"]),
            "wall_time_s": round(wall, 1),
            "pairs_per_s": round(args.rows / wall, 1),
            "manifest_pairs_per_s": manifest["pairs_per_s"],
            "input_generation_s": round(gen_s, 1),
            "readback_s": round(readback_s, 1),
            "peak_rss_mib": {
                "driver": round(sampler.driver_peak / MIB),
                "largest_ray_worker": round(sampler.worker_peak / MIB),
                "largest_ray_worker_name": sampler.worker_peak_name,
                "all_ray_processes": round(sampler.ray_total_peak / MIB),
                "samples": sampler.samples,
            },
            "object_store_spill": {
                **spilled_from_summary(summary),
                "spill_dir_peak_mib": round(sampler.spill_peak / MIB, 1),
                "memory_summary": summary.strip().splitlines()[-12:],
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``rerank-ray demo``: sample shards -> a real run on a local Ray instance -> a summary."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rerank_ray.config import DEFAULT_MODEL, JobConfig
from rerank_ray.tiny_model import SAMPLE_TEXTS, build_tiny_reranker

NUM_SHARDS = 4


def make_sample_shards(out_dir: Path, rows: int, seed: int = 0) -> Path:
    """Write ``rows`` synthetic (query, doc) pairs over a few Parquet shards.

    A handful of rows are deliberately bad (null query, empty doc) to show rejects.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, rows // NUM_SHARDS)
    n = 0
    for shard in range(NUM_SHARDS):
        count = per_shard if shard < NUM_SHARDS - 1 else rows - n
        records = {"query_id": [], "query": [], "doc_id": [], "doc": [], "retrieval_rank": []}
        for i in range(count):
            q = (n + i) // 20
            records["query_id"].append(f"q{q:05d}")
            records["query"].append(SAMPLE_TEXTS[(q * 2) % len(SAMPLE_TEXTS)])
            records["doc_id"].append(f"d{n + i:07d}")
            words = " ".join(rng.choice(SAMPLE_TEXTS) for _ in range(rng.randint(1, 12)))
            records["doc"].append(words)
            records["retrieval_rank"].append((n + i) % 20 + 1)
        if shard == 0 and count >= 3:
            records["query"][1] = None
            records["doc"][2] = ""
        pq.write_table(pa.table(records), out_dir / f"pairs-{shard:03d}.parquet")
        n += count
    return out_dir


def pick_model(workdir: Path, model: str | None) -> tuple[str, str]:
    """The model to run with, and a sentence saying which one and why."""
    if model:
        return model, f"model: {model}"
    try:
        from huggingface_hub import snapshot_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        path = snapshot_download(
            DEFAULT_MODEL, allow_patterns=["*.json", "*.safetensors", "*.model"]
        )
        return path, f"model: {DEFAULT_MODEL} (from the Hugging Face hub)"
    except Exception as err:  # any hub failure means the same here: use a local model
        tiny = build_tiny_reranker(workdir / "tiny-model")
        return str(tiny), (
            f"model: {DEFAULT_MODEL} could not be fetched ({type(err).__name__}); using a SMALL "
            f"LOCAL MODEL with random weights at {tiny} instead. Its scores are meaningless; "
            "the pipeline is the real one. Pass --model to use your own."
        )


def run_demo(workdir: Path, rows: int = 2000, model: str | None = None) -> dict:
    """Generate sample shards, run the job locally, print where the output is."""
    import ray

    from rerank_ray import logs
    from rerank_ray.pipeline import run

    workdir = workdir.resolve()
    shards = make_sample_shards(workdir / "input", rows)
    model_path, note = pick_model(workdir, model)
    print(f"rerank-ray demo: {note}", flush=True)
    if not ray.is_initialized():
        logs.quiet_ray_logs()  # as the job does before it starts Ray
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    cfg = JobConfig(
        input=str(shards),
        output=str(workdir / "output"),
        model=model_path,
        tokenize_actors=1,
        num_actors=1,
    )
    manifest = run(cfg)
    print(f"rerank-ray demo: input shards in {shards}", flush=True)
    print(f"rerank-ray demo: output (Hive-partitioned Parquet) in {workdir / 'output'}")
    print(f"rerank-ray demo: manifest {workdir / 'output' / '_SUCCESS'}")
    print(
        'rerank-ray demo: read it back with: python -c "import pyarrow.dataset as ds; '
        f"print(ds.dataset('{workdir / 'output'}', partitioning='hive', "
        'exclude_invalid_files=True).to_table().to_pandas().head())"'
    )
    return manifest

"""Tokenize stage rate on one core: before (HF tokenizer call) and after, in the same run.

    python bench/tokenize_rate.py --out bench/results/tokenize_rate_<date>.json

Texts: the GPU benchmark's workload (``workload.py``, ~121 tokens per pair) with its
synthetic word-level tokenizer, and the same pairs through the tiny test model's trained
tokenizer (``rerank_ray.tiny_model``) as a subword tokenizer; 100 candidates per query.
Blocks of 2,048 rows as the job hands them over. Variants: the HF tokenizer call (before),
the Rust batch call, and the Rust batch call with each distinct query tokenized once per
block (the stage's default). They alternate; each figure is the best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core, as in a tokenize actor
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
from workload import make_workload, save_synthetic_tokenizer  # noqa: E402

from rerank_ray.tiny_model import build_tiny_reranker  # noqa: E402
from rerank_ray.tokenize import TokenizeStage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--pairs", type=int, default=20_480)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tokrate-"))
    save_synthetic_tokenizer(str(tmp / "wordlevel"))
    build_tiny_reranker(tmp / "tiny")
    pairs = make_workload(args.pairs).texts()
    batch = pa.table(
        {
            "query_id": [str(i // 100) for i in range(len(pairs))],
            "query": [q for q, _ in pairs],
            "doc_id": [str(i) for i in range(len(pairs))],
            "doc": [d for _, d in pairs],
        }
    )
    blocks = [batch.slice(i, 2048) for i in range(0, batch.num_rows, 2048)]
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "pairs": batch.num_rows,
        "block_rows": 2048,
        "results": [],
    }
    for name in ("wordlevel", "tiny"):
        stages = {}
        for label in ("before_hf_call", "rust_batch", "rust_batch_distinct_queries"):
            stage = TokenizeStage(str(tmp / name), 512, 384)
            if label == "before_hf_call":
                stage._raw = None  # the HF tokenizer call, as before the Rust batch path
            stage.distinct_queries = label == "rust_batch_distinct_queries"
            stages[label] = stage
        ref = [stages["before_hf_call"](b)["input_ids"] for b in blocks]
        same = all(
            stage(b)["input_ids"].equals(r)
            for stage in stages.values()
            for b, r in zip(blocks, ref, strict=True)
        )
        best = dict.fromkeys(stages, 0.0)
        for _ in range(args.repeats):
            for label, stage in stages.items():
                t0 = time.perf_counter()
                for b in blocks:
                    stage(b)
                best[label] = max(best[label], batch.num_rows / (time.perf_counter() - t0))
        row = {"tokenizer": name, "identical_ids": same}
        row |= {f"{k}_pairs_per_s": round(v) for k, v in best.items()}
        row["speedup_vs_before"] = round(
            best["rust_batch_distinct_queries"] / best["before_hf_call"], 2
        )
        print(row, flush=True)
        report["results"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

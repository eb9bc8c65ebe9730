"""Long documents: the whole job on documents of 1-4k tokens, chunked versus truncated.

One command on the GPU machine (README: Long documents; bench/README.md):

    PYTHONPATH=. python3 bench/long_docs.py --out "$OUT"

builds the bge-reranker-v2-m3 architecture (random weights, 8,192 positions) with the
synthetic word-level tokenizer of ``workload.py`` (one token per word), writes pairs whose
documents have 1,024-4,096 words, and runs the job (Parquet -> tokenize -> score -> Parquet,
local Ray, every GPU) once per variant ``MODE@MAX_LENGTH``: ``truncate@512`` (today's
default), ``chunk@512`` (windows covering the whole document), ``truncate@2048`` and
``truncate@8192`` (a long ``max_length``), ``chunk@2048``. Each variant runs on a small and a
large input; the difference of the two walls is the steady rate, in pairs/s and in tokens/s
of what the model actually scored (pair or window lengths, counted with the tokenize stage's
own window arithmetic). ``--tiny`` runs a 2-layer model of the same vocabulary on CPU (a
smoke test of the script, not a performance figure). Writes ``long_docs.json``.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import (  # noqa: E402
    SPECIAL_TOKENS_PER_PAIR,
    VOCAB_SIZE,
    Workload,
    make_workload,
    save_synthetic_tokenizer,
)
from rerank_ray.pairs import Chunking, window_spans  # noqa: E402
from rerank_ray.tiny_model import BGE_M3_SHAPE, random_classifier, xlmr_config  # noqa: E402

POSITIONS = 8192


def save_model(path: str, tiny: bool, device: str) -> None:
    """Random-weight XLM-R cross-encoder (bge-reranker-v2-m3's shape, or 2x32 with ``tiny``)
    of the synthetic vocabulary and ``POSITIONS`` positions, and that tokenizer, under
    ``path``."""
    import torch

    shape = {
        **({} if tiny else BGE_M3_SHAPE),
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": POSITIONS + 2,  # XLM-R numbers positions from pad_token_id + 1
    }
    with torch.device(device):
        model = random_classifier(xlmr_config(**shape))
    model = model.to(torch.float32 if device == "cpu" else torch.float16)
    model.save_pretrained(path)
    save_synthetic_tokenizer(path)


def scored_tokens(work: Workload, pairs: int, mode: str, max_length: int, chunking: Chunking):
    """Tokens the model runs on for the first ``pairs`` pairs: each pair's length when
    truncating, the sum of its windows' when chunking (the stage's own arithmetic)."""
    qmax = max_length * 3 // 4
    q_keep = np.minimum([len(work.query_words[q]) for q in work.query_of_pair[:pairs]], qmax)
    d_len = np.array([len(d) for d in work.doc_words[:pairs]])
    room = max_length - SPECIAL_TOKENS_PER_PAIR - q_keep
    if mode == "truncate":
        return int((SPECIAL_TOKENS_PER_PAIR + q_keep + np.minimum(d_len, room)).sum())
    _, lengths, count, _ = window_spans(d_len, room, chunking)
    return int(lengths.sum() + ((SPECIAL_TOKENS_PER_PAIR + q_keep) * count).sum())


def run_variant(args, root: Path, model_dir: str, mode: str, max_length: int) -> dict:
    import rerank_ray
    from bench.run_bench import trace_summary

    walls = {}
    for name in ("small", "large"):
        cfg = rerank_ray.JobConfig(
            input=str(root / name),
            output=str(root / f"out-{name}-{mode}-{max_length}"),
            model=model_dir,
            device=args.device,
            dtype="float32" if args.device == "cpu" else "float16",
            max_length=max_length,
            long_docs=mode,
            chunk_overlap=args.chunk_overlap,
            max_chunks_per_doc=args.max_chunks,
            num_actors=args.gpus if args.device == "cuda" else 1,
            tokenize_actors=args.tokenize_actors,
            batch_rows=args.batch_rows,
        )
        start = time.time()
        t0 = time.perf_counter()
        manifest = rerank_ray.run(cfg)
        walls[name] = time.perf_counter() - t0
        expected = args.small_pairs if name == "small" else args.pairs
        if manifest.get("rows_scored") != expected:
            raise RuntimeError(f"{mode}@{max_length} scored {manifest.get('rows_scored')}")
        if name == "large":
            stages = trace_summary(root / "trace", start)
            truncated = manifest["rows_truncated"]
    chunking = Chunking(args.chunk_overlap, args.max_chunks)
    tokens = {
        n: scored_tokens(args.work, p, mode, max_length, chunking)
        for n, p in (("small", args.small_pairs), ("large", args.pairs))
    }
    seconds = walls["large"] - walls["small"]
    return {
        "variant": f"{mode}@{max_length}",
        "long_docs": mode,
        "max_length": max_length,
        "pairs_small": args.small_pairs,
        "pairs_large": args.pairs,
        "wall_small_s": round(walls["small"], 1),
        "wall_large_s": round(walls["large"], 1),
        "scored_tokens_large": tokens["large"],
        "tokens_per_pair": round(tokens["large"] / args.pairs, 1),
        "rows_truncated_large": truncated,
        "steady_pairs_per_s": round((args.pairs - args.small_pairs) / seconds, 1),
        "steady_tokens_per_s": round((tokens["large"] - tokens["small"]) / seconds, 0),
        "end_to_end_pairs_per_s": round(args.pairs / walls["large"], 1),
        "stages_in_large_run": stages,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for long_docs.json.")
    p.add_argument(
        "--variants",
        default="truncate@512,chunk@512,truncate@2048,chunk@2048,truncate@8192",
        help="Comma list of MODE@MAX_LENGTH (MODE: truncate or chunk).",
    )
    p.add_argument("--pairs", type=int, default=8_000, help="Pairs of the large input.")
    p.add_argument("--small-pairs", type=int, default=800, help="Pairs of the small input.")
    p.add_argument("--doc-tokens", default="1024,4096", help="Document length range, words.")
    p.add_argument("--chunk-overlap", type=int, default=64)
    p.add_argument(
        "--max-chunks", type=int, default=16, help="Windows per document (16 x 512 covers 4k)."
    )
    p.add_argument("--batch-rows", type=int, default=512)
    p.add_argument("--gpus", type=int, default=None, help="Scoring actors; default every GPU.")
    p.add_argument(
        "--tokenize-actors", type=int, default=None, help="Default: the job's (2 per GPU)."
    )
    p.add_argument("--tiny", action="store_true", help="2-layer model on CPU: a smoke test.")
    args = p.parse_args(argv)
    import ray
    import torch

    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.gpus = args.gpus or max(1, torch.cuda.device_count())
    low, high = (int(x) for x in args.doc_tokens.split(","))
    args.work = make_workload(args.pairs, doc_tokens=(low, high))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="long-docs-"))
    model_dir = str(root / "model")
    save_model(model_dir, args.tiny, args.device)
    args.work.write_parquet(root / "small", args.small_pairs, shard_rows=2_000)
    args.work.write_parquet(root / "large", args.pairs, shard_rows=2_000)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
        "gpus": args.gpus if args.device == "cuda" else 0,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny 2x32 XLM-R (smoke test)"
        if args.tiny
        else "bge-reranker-v2-m3 architecture (24x1024), random weights",
        "workload": {
            "pairs": args.pairs,
            "doc_words": [low, high],
            "distribution": "bench/workload.py make_workload(doc_tokens=...): query U[6,20] words, doc "
            "uniform words, one token per word, 4 special tokens per pair",
            "chunk_overlap": args.chunk_overlap,
            "max_chunks_per_doc": args.max_chunks,
        },
        "results": [],
        "errors": {},
    }
    repo = str(Path(__file__).resolve().parent.parent)
    on_cpu = args.device == "cpu"
    ray.init(
        num_gpus=0 if on_cpu else torch.cuda.device_count(),
        # On a small CPU machine the read, tokenize and scoring tasks share a few cores.
        num_cpus=max(4, os.cpu_count() or 1) if on_cpu else None,
        include_dashboard=False,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": ":".join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
                "RERANK_RAY_TRACE_DIR": str(root / "trace"),
            }
        },
    )
    try:
        for variant in args.variants.split(","):
            mode, length = variant.split("@")
            try:
                row = run_variant(args, root, model_dir, mode, int(length))
            except Exception as err:  # one failing variant must not lose the others
                report["errors"][variant] = repr(err)[-2000:]
                print(variant, "failed:", err, flush=True)
                continue
            report["results"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "stages_in_large_run"}))
            (out / "long_docs.json").write_text(json.dumps(report, indent=1))
    finally:
        ray.shutdown()
        (out / "long_docs.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

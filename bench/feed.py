"""Is the GPU fed? The job end to end, as a user runs it, for a small and a large cross-encoder
with real subword tokenizers, next to FlagReranker on the same model and pairs.

    python bench/feed.py --minilm-tokenizer DIR --out OUT_DIR

Models (random weights: speed does not depend on their values):
- ``minilm``: the MiniLM-L6 shape (BERT, 6 layers, hidden 384) with the trained
  all-MiniLM-L6-v2 WordPiece tokenizer (``DIR``; bench/README.md says how to unpack it);
- ``bge-m3``: the bge-reranker-v2-m3 shape (XLM-R large) with an XLM-R-style unigram
  tokenizer trained on the workload's text (``tokenize_rate.save_unigram_tokenizer``).

Workload: ``tokenize_rate.make_blocks`` (English prose, ~100 documents per query; documents
of ``--doc-words`` words: 60-120 give ~127 tokens per pair with the MiniLM tokenizer, 46-93
~102), written as Parquet shards. Each job is ``python -m rerank_ray.cli run`` in its own
process, with default flags plus the variant's (``--jobs``), so it pays its own Ray start, as
a user's run does. Per job: wall seconds, rows scored, the run's metrics from its manifest
(the scoring actors' busy share, the tokenize actors the pool used), and a timeline: when the
job's output showed Ray started, the pools planned and the run committed, and when the
process exited. FlagReranker (fp16, batch 128) scores ``--flag-pairs`` of the same pairs
after the jobs, in this process. Writes ``feed.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from tokenize_rate import corpus_lines, make_blocks, prose_words, save_unigram_tokenizer  # noqa: E402

SHARD_BLOCKS = 25  # 2,048-row blocks per Parquet shard
# A job's output lines that mark its phases (the first line holding each).
TIMELINE_MARKERS = {
    "ray_started": "Started a local Ray instance",
    "pools_planned": "actor pools:",
    "committed": " committed: ",
}
DEFAULT_JOBS = "minilm:default,minilm:--tokenize-actors=14,bge-m3:default,bge-m3:--precision=fp8"


def build_model(name: str, folder: Path, minilm_tokenizer: Path, texts: list[str]) -> Path:
    """The ``name`` model (module docstring), random weights, fp16 safetensors."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaForSequenceClassification,
    )

    from rerank_ray.tiny_model import BGE_M3_SHAPE, xlmr_config

    folder.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        for f in minilm_tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
                shutil.copy(f, folder / f.name)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
        cfg = BertConfig(
            vocab_size=vocab, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512, num_labels=1,
        )  # fmt: skip
        cls = BertForSequenceClassification
    elif name == "bge-m3":
        save_unigram_tokenizer(folder, texts, vocab_size=32000)
        cfg, cls = xlmr_config(**BGE_M3_SHAPE), XLMRobertaForSequenceClassification
    else:
        raise SystemExit(f"unknown model {name!r}: minilm or bge-m3")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = cls(cfg).half().eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_input(
    folder: Path, words: list[str], pairs: int, doc_words: tuple[int, int] = (60, 120)
) -> int:
    """Parquet shards of ``pairs`` rows (rounded up to whole blocks, documents of
    ``doc_words`` words), replacing any earlier input there; the rows written."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    blocks = make_blocks(words, -(-pairs // 2048), seed=1, doc_words=doc_words)
    for k in range(0, len(blocks), SHARD_BLOCKS):
        pq.write_table(pa.concat_tables(blocks[k : k + SHARD_BLOCKS]), folder / f"p{k:05d}.parquet")
    return sum(b.num_rows for b in blocks)


def run_job(
    model_dir: Path, input_dir: Path, out_dir: Path, flags: list[str], env_vars: dict
) -> dict:
    """One ``rerank-ray run`` in its own process (``env_vars`` added to its environment):
    wall time and the manifest's figures."""
    tree = str(Path(env_vars.get("tree", ROOT)).resolve())  # whose rerank_ray runs the job
    env = {
        **os.environ,
        **{k: v for k, v in env_vars.items() if k != "tree"},
        "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "rerank_ray.cli", "run", "--input", str(input_dir)]
    cmd += ["--output", str(out_dir), "--model", str(model_dir), *flags]
    t0 = time.perf_counter()
    # Run from the tree: `python -m` puts the working directory first on sys.path, ahead of
    # PYTHONPATH, and Ray's workers add the driver's working directory too.
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, timeline = [], {}
    for line in proc.stdout:  # stamped as they come: where the seconds outside the run went
        lines.append(line.rstrip())
        for key, marker in TIMELINE_MARKERS.items():
            if marker in line and key not in timeline:
                timeline[key] = round(time.perf_counter() - t0, 2)
    returncode = proc.wait()
    wall = time.perf_counter() - t0
    timeline["exit"] = round(wall, 2)
    if returncode != 0:
        return {"flags": flags, "error": "\n".join(lines)[-3000:]}
    manifest = json.loads(next((out_dir / "_manifests").glob("*.json")).read_text())
    metrics = manifest.get("metrics", {})
    stages = metrics.get("stages", {})
    scorers = [a for a in metrics.get("actors", []) if a.get("stage") == "score"]
    score, tok = stages.get("score", {}), stages.get("tokenize", {})
    scored = manifest.get("rows_scored")
    return {
        "flags": flags,
        "env": env_vars,
        "rows_read": manifest.get("rows_read"),
        "rows_scored": scored,
        "wall_s": round(wall, 1),
        "end_to_end_pairs_per_s": round(scored / wall, 1) if scored else None,
        "scoring_pairs_per_s_in_span": score.get("pairs_per_s_in_span"),
        "scoring_busy_fraction": score.get("busy_fraction"),
        "scoring_first_call_s": score.get("first_call_s"),
        "gpu_utilization_mean_pct": [a.get("gpu_utilization_mean_pct") for a in scorers],
        "tokenize_actors_used": tok.get("actors"),
        "tokenize_pool": metrics.get("tokenize_pool"),
        "batch_rows": metrics.get("batch_rows"),
        "tokenize_busy_fraction": tok.get("busy_fraction"),
        "tokenize_rows_per_busy_s": tok.get("rows_per_busy_s"),
        "tokens_per_pair": round(score["tokens"] / score["pairs"], 1)
        if score.get("pairs")
        else None,
        "startup_s": metrics.get("startup_s"),
        "manifest_wall_s": manifest.get("wall_time_s"),
        "timeline_s": timeline,
        "score_actor_setup_s": [a.get("setup_seconds") for a in scorers],
        "summary_line": [next((x for x in reversed(lines) if "committed:" in x), "")],
    }


def flag_reranker(model_dir: Path, input_dir: Path, pairs: int) -> dict:
    """FlagReranker fp16, batch 128, on the first ``pairs`` rows of the input."""
    from FlagEmbedding import FlagReranker

    table = pq.read_table(sorted(input_dir.glob("*.parquet"))[0]).slice(0, pairs)
    texts = list(zip(table["query"].to_pylist(), table["doc"].to_pylist(), strict=True))
    rr = FlagReranker(str(model_dir), use_fp16=True, batch_size=128, devices=["cuda:0"])
    rr.compute_score(texts[:512])  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    rr.compute_score(texts)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del rr
    torch.cuda.empty_cache()
    return {
        "pairs": len(texts),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(len(texts) / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rerank-feed"))
    parser.add_argument(
        "--jobs",
        default=DEFAULT_JOBS,
        help="model:words,...; words: default, or --flag=value, NAME=value (environment) and "
        "tree=DIR (run DIR's rerank_ray, e.g. `git archive REV rerank_ray | tar -x -C DIR`)",
    )
    parser.add_argument("--pairs", default="minilm=600000,bge-m3=400000")
    parser.add_argument("--flag-pairs", default="minilm=20000,bge-m3=4000")
    parser.add_argument(
        "--doc-words", default="60-120", help="MIN-MAX words per document (module docstring)"
    )
    parser.add_argument(
        "--ray-data-logs", action="store_true", help="copy each job's Ray Data log into --out"
    )
    args = parser.parse_args()
    pairs = dict((k, int(v)) for k, v in (p.split("=") for p in args.pairs.split(",")))
    flag_pairs = dict((k, int(v)) for k, v in (p.split("=") for p in args.flag_pairs.split(",")))
    doc_words = tuple(int(v) for v in args.doc_words.split("-"))
    report = {
        "what": "job end to end (CLI, default flags + variant), real subword tokenizers",
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpus": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "doc_words": list(doc_words),
        "models": {},
    }
    words = prose_words(corpus_lines())
    texts = [" ".join(words[i : i + 200]) for i in range(0, len(words), 200)]
    jobs = [j.split(":", 1) for j in args.jobs.split(",")]
    for name in dict.fromkeys(m for m, _ in jobs):
        t0 = time.perf_counter()
        model_dir = build_model(name, args.work / name / "model", args.minilm_tokenizer, texts)
        rows = write_input(args.work / name / "input", words, pairs[name], doc_words)
        entry = report["models"].setdefault(name, {"pairs": rows, "jobs": []})
        entry["setup_s"] = round(time.perf_counter() - t0, 1)
        for k, (_, spec) in enumerate(j for j in jobs if j[0] == name):
            spec_words = [] if spec == "default" else spec.split()
            env_vars = dict(w.split("=", 1) for w in spec_words if not w.startswith("--"))
            flags = [p for w in spec_words if w.startswith("--") for p in w.split("=", 1)]
            out_dir = args.work / name / f"out{k}"
            shutil.rmtree(out_dir, ignore_errors=True)
            entry["jobs"].append(
                run_job(model_dir, args.work / name / "input", out_dir, flags, env_vars)
            )
            print(name, json.dumps(entry["jobs"][-1]), flush=True)
            if args.ray_data_logs:  # Ray Data's own operator log of the job's Ray session
                logs = Path("/tmp/ray/session_latest/logs/ray-data")
                shutil.copytree(logs, args.out / f"ray-data-{name}-{k}", dirs_exist_ok=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "feed.json").write_text(json.dumps(report, indent=1) + "\n")
        try:
            entry["flag_reranker_fp16"] = flag_reranker(
                model_dir, args.work / name / "input", flag_pairs[name]
            )
        except Exception as e:  # a peer failing must not lose the job's figures
            entry["flag_reranker_fp16"] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        print(name, "FlagReranker", entry["flag_reranker_fp16"], flush=True)
        (args.out / "feed.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

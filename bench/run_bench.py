"""GPU benchmark of rerank-ray's scorer against FlagReranker and sentence-transformers.

One command on the GPU machine (see bench/README.md):

    PYTHONPATH=. python3 bench/run_bench.py --out "$OUT"

builds the full-size bge-reranker-v2-m3 architecture with random weights, generates the
workload of ``bench/workload.py`` and measures, in one process and on one GPU: a dense matmul
peak, FlagReranker(use_fp16) and CrossEncoder (fp16) on a subset, HF's padded forward on
length-sorted token-budget batches, and the padding-free encoder (eager, fp16/bf16,
several budgets plus the autotuned one), each driven the way the scorer drives it (blocks of
rows, length sort, budget cut, one micro-batch in flight ahead, results back in input order).
``--sections scaling`` runs the padding-free scorer in 1 and in N Ray actors (one GPU each).
Writes ``bench.json`` (device, date, every figure) and ``bench.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workload import PAD, encoder_flops, make_workload, save_synthetic_tokenizer  # noqa: E402
from rerank_ray.autotune import autotune_token_budget  # noqa: E402
from rerank_ray.backoff import TokenBudget, score_microbatches  # noqa: E402
from rerank_ray.packing import (  # noqa: E402
    MicroBatch,
    inverse_order,
    length_order,
    token_budget_spans,
)
from rerank_ray.runners import RunnerOptions  # noqa: E402
from rerank_ray.runners.encoder import PackedEncoder  # noqa: E402
from rerank_ray.runners.packed import kernel_options  # noqa: E402

SECTIONS = (
    "matmul",
    "correctness",
    "autotune",
    "packed",
    "profile",
    "hf_padded",
    "peers",
    "job",
    "scaling",
)
GIB = 2**30


class HFPaddedRunner:
    """Baseline runner: HF's own forward on a padded micro-batch with an attention mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def score(self, ids_flat, offsets, type_ids_flat=None) -> np.ndarray:
        lengths = np.diff(offsets)
        width = int(lengths.max())
        cols = np.arange(len(ids_flat)) - np.repeat(offsets[:-1], lengths)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        ids = np.full((len(lengths), width), PAD, dtype=np.int64)
        ids[rows, cols] = ids_flat
        ids_t = torch.from_numpy(ids).pin_memory().to(self.device, non_blocking=True)
        mask = ids_t != PAD
        return (
            self.model(input_ids=ids_t, attention_mask=mask).logits.view(-1).float().cpu().numpy()
        )


def gather_rows(ids_flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray):
    """Packed ids and offsets of ``rows`` (in that order)."""
    lengths = offsets[rows + 1] - offsets[rows]
    new_off = np.zeros(len(rows) + 1, dtype=np.int64)
    new_off[1:] = np.cumsum(lengths)
    src = np.repeat(offsets[rows] - new_off[:-1], lengths) + np.arange(new_off[-1])
    return ids_flat[src], new_off


def score_rows(runner, ids_flat, offsets, budget: TokenBudget, *, padded=False, block_rows=4096):
    """Score every row as the scorer stage does: per block, sort by length (longest first),
    cut with the scorer's packer, score the micro-batches (one in flight ahead), restore
    input order."""
    out = np.empty(len(offsets) - 1, dtype=np.float32)
    for b0 in range(0, len(out), block_rows):
        b1 = min(b0 + block_rows, len(out))
        lengths = offsets[b0 + 1 : b1 + 1] - offsets[b0:b1]
        order = length_order(lengths)
        ids, off = gather_rows(ids_flat, offsets, order + b0)
        mbs = []
        for s, e in token_budget_spans(lengths[order], budget.value, padded):
            lo, hi = off[s], off[e]
            mbs.append(MicroBatch(ids[lo:hi], off[s : e + 1] - lo, None))
        scores = np.concatenate(score_microbatches(runner, mbs, budget, padded=padded))
        out[b0:b1] = scores[inverse_order(order)]
    return out


def build_model(dtype=torch.float32):
    from transformers import XLMRobertaForSequenceClassification

    from rerank_ray.tiny_model import BGE_M3_SHAPE, xlmr_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = XLMRobertaForSequenceClassification(xlmr_config(**BGE_M3_SHAPE))
    return model.to(dtype).eval()


def timed(fn, sync=True):
    if sync:
        torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    value = fn()
    if sync:
        torch.cuda.synchronize()
    return value, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / GIB


def seconds_per_call(fn, reps: int = 20, warmup: int = 3) -> float:
    """Mean wall seconds of ``fn()`` on the GPU, after ``warmup`` calls, synchronized."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def ms_per_call(fn) -> float:
    """``seconds_per_call`` in milliseconds, rounded for the report."""
    return round(1e3 * seconds_per_call(fn), 3)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.report = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name(0),
            "gpus": torch.cuda.device_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "model": "bge-reranker-v2-m3 architecture (XLMRobertaForSequenceClassification, "
            "24x1024, random weights)",
            "results": [],
            "errors": {},
        }
        import transformers

        self.report["transformers"] = transformers.__version__
        self.work = make_workload(args.pairs, max_length=args.max_length)
        self.ids, self.offsets = self.work.tokenized()
        self.lengths = np.diff(self.offsets)
        self.report["workload"] = {
            "pairs": int(len(self.lengths)),
            "mean_tokens": float(self.lengths.mean()),
            "median_tokens": float(np.median(self.lengths)),
            "p99_tokens": float(np.percentile(self.lengths, 99)),
            "max_length": args.max_length,
            "at_max_length": float((self.lengths >= args.max_length).mean()),
            "distribution": "bench/workload.py: query U[6,20] words, doc round(exp(N(4.49,0.55))) "
            "words clipped [8,700], 4 special tokens, doc truncated to max_length",
        }
        self.model16 = build_model(torch.float16)
        self.peak = None
        self.model_dir = None

    # --- helpers ----------------------------------------------------------------------------
    def flops(self, lengths, first_token_last_layer=False):
        return encoder_flops(lengths, 1024, 4096, 24, first_token_last_layer)

    def record(self, name, pairs_lengths, seconds, peak_gib, first_token_last_layer=False, **extra):
        """One result row. TFLOP/s and % of peak count the FLOPs the runner executes: the whole
        model for peers and HF, less the last layer's non-first tokens for the scorer's
        default (``first_token_last_layer``)."""
        flops = self.flops(pairs_lengths, first_token_last_layer)
        tflops = flops / seconds / 1e12
        row = {
            "name": name,
            "pairs": int(len(pairs_lengths)),
            "seconds": round(seconds, 3),
            "pairs_per_s": round(len(pairs_lengths) / seconds, 1),
            "tokens_per_s": round(float(pairs_lengths.sum()) / seconds, 0),
            "tflops": round(tflops, 1),
            "pct_of_matmul_peak": round(100 * tflops / self.peak, 1) if self.peak else None,
            "peak_gpu_mem_gib": round(peak_gib, 2),
            **extra,
        }
        self.report["results"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self):
        (self.out / "bench.json").write_text(json.dumps(self.report, indent=1))

    def subset(self, n):
        n = min(n, len(self.lengths))
        return self.ids[: self.offsets[n]], self.offsets[: n + 1]

    def saved_model_dir(self):
        if self.model_dir is None:
            self.model_dir = tempfile.mkdtemp(prefix="bge-random-")
            self.model16.save_pretrained(self.model_dir)
            save_synthetic_tokenizer(self.model_dir)
        return self.model_dir

    # --- sections ---------------------------------------------------------------------------
    def matmul(self):
        peaks = {}
        for dtype in (torch.bfloat16, torch.float16):
            n = 8192
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            sec = seconds_per_call(lambda a=a, b=b: a @ b)
            peaks[str(dtype).split(".")[-1]] = 2 * n**3 / sec / 1e12
            del a, b
        self.peak = max(peaks.values())
        self.report["matmul_peak_tflops"] = {k: round(v, 1) for k, v in peaks.items()}
        print("matmul peak", peaks, flush=True)

    def correctness(self):
        from scipy.stats import spearmanr

        n = min(self.args.check_pairs, len(self.lengths))
        ids, off = self.subset(n)
        budget = 32768
        model32 = build_model(torch.float32)
        ref32 = score_rows(HFPaddedRunner(model32), ids, off, TokenBudget(budget, 512), padded=True)
        pk32 = score_rows(
            PackedEncoder(model32, attention="sdpa"), ids, off, TokenBudget(budget, 512)
        )
        del model32
        torch.cuda.empty_cache()
        ref16 = score_rows(
            HFPaddedRunner(self.model16), ids, off, TokenBudget(budget, 512), padded=True
        )
        pk16 = score_rows(PackedEncoder(self.model16), ids, off, TokenBudget(budget, 512))
        pk16g = score_rows(
            PackedEncoder(self.model16, gelu_epilogue=True), ids, off, TokenBudget(budget, 512)
        )
        pk16f = score_rows(
            PackedEncoder(self.model16, fused_layer_norm=True),
            ids,
            off,
            TokenBudget(budget, 512),
        )
        pk16d = score_rows(  # the scorer's default
            PackedEncoder(self.model16, **default_kernels(self.model16)),
            ids,
            off,
            TokenBudget(budget, 512),
        )
        queries = self.work.query_of_pair[:n]

        def per_query_spearman(a, b):
            rhos = [spearmanr(a[queries == q], b[queries == q])[0] for q in np.unique(queries)]
            return float(np.min(rhos)), float(np.mean(rhos))

        spread = np.mean([ref32[queries == q].std() for q in np.unique(queries)])
        self.report["correctness"] = {
            "pairs": n,
            "queries": int(len(np.unique(queries))),
            "mean_within_query_logit_std_fp32": float(spread),
            "packed_fp32_vs_hf_fp32_max_abs": float(np.abs(pk32 - ref32).max()),
            "packed_fp16_vs_hf_fp16_max_abs": float(np.abs(pk16 - ref16).max()),
            "packed_fp16_vs_hf_fp32_max_abs": float(np.abs(pk16 - ref32).max()),
            "hf_fp16_vs_hf_fp32_max_abs": float(np.abs(ref16 - ref32).max()),
            "packed_fp16_vs_hf_fp32_spearman_min_mean": per_query_spearman(pk16, ref32),
            "hf_fp16_vs_hf_fp32_spearman_min_mean": per_query_spearman(ref16, ref32),
            "packed_fp16_fused_kernels_vs_packed_fp16_max_abs": float(np.abs(pk16f - pk16).max()),
            "packed_fp16_fused_kernels_vs_hf_fp32_max_abs": float(np.abs(pk16f - ref32).max()),
            "packed_fp16_fused_kernels_vs_hf_fp32_spearman_min_mean": per_query_spearman(
                pk16f, ref32
            ),
            "packed_fp16_default_kernels_vs_hf_fp32_max_abs": float(np.abs(pk16d - ref32).max()),
            "packed_fp16_default_kernels_vs_hf_fp32_spearman_min_mean": per_query_spearman(
                pk16d, ref32
            ),
            "packed_fp16_gelu_epilogue_vs_hf_fp32_max_abs": float(np.abs(pk16g - ref32).max()),
            "packed_fp16_gelu_epilogue_vs_hf_fp32_spearman_min_mean": per_query_spearman(
                pk16g, ref32
            ),
        }
        print("correctness", self.report["correctness"], flush=True)
        self.save()

    def autotune(self):
        enc = PackedEncoder(self.model16)
        t0 = time.perf_counter()
        value = autotune_token_budget(
            enc,
            model="bge-m3-random",
            dtype="float16",
            max_length=self.args.max_length,
            cache_path=None,
            max_budget=self.args.max_budget,
        )
        self.report["autotune"] = {
            "budget": value,
            "seconds": round(time.perf_counter() - t0, 2),
            "max_budget": self.args.max_budget,
        }
        print("autotune", self.report["autotune"], flush=True)
        self.save()

    def run_packed(self, name, enc, budget, pairs, **extra):
        ids, off = self.subset(pairs)
        warm = min(20_000, pairs)
        score_rows(enc, *self.subset(warm), TokenBudget(budget, 512))  # warm-up / compile
        tb = TokenBudget(budget, 512)
        _, sec, mem = timed(lambda: score_rows(enc, ids, off, tb))
        self.record(
            name,
            np.diff(off),
            sec,
            mem,
            first_token_last_layer=getattr(enc, "first_token_last_layer", False),
            budget=budget,
            final_budget=tb.value,
            **extra,
        )

    def packed(self):
        n = self.args.packed_pairs
        enc = PackedEncoder(self.model16)
        for budget in self.args.budgets:
            self.run_packed(f"padding-free fp16 eager, budget {budget}", enc, budget, n)
        tuned = self.report.get("autotune", {}).get("budget")
        best = tuned or max(self.args.budgets)
        if tuned and tuned not in self.args.budgets:
            self.run_packed(f"padding-free fp16 eager, autotuned {tuned}", enc, tuned, n)
        del enc
        fused = {"fused_layer_norm": True}
        enc = PackedEncoder(self.model16, **fused)
        self.run_packed(f"padding-free fp16 fused add+LN (Triton), budget {best}", enc, best, n)
        # The default's parts one by one: Triton add+LN and attention, the last layer on
        # first tokens, the Triton exact GELU.
        no_gelu = {**default_kernels(self.model16), "triton_gelu": False}
        enc = PackedEncoder(self.model16, first_token_last_layer=False, **no_gelu)
        self.run_packed(
            f"padding-free fp16 add+LN + attention (Triton), whole last layer, budget {best}",
            enc,
            best,
            n,
        )
        enc = PackedEncoder(self.model16, **no_gelu)
        self.run_packed(
            f"padding-free fp16 add+LN + attention (Triton), last layer on first tokens, "
            f"budget {best}",
            enc,
            best,
            n,
        )
        enc = PackedEncoder(self.model16, **default_kernels(self.model16))
        self.run_packed(
            f"padding-free fp16 default (+ Triton exact GELU), budget {best}", enc, best, n
        )
        enc = PackedEncoder(self.model16, **{**no_gelu, "gelu_epilogue": True})
        self.run_packed(
            f"padding-free fp16 default + GELU epilogue (--fast-gelu), budget {best}",
            enc,
            best,
            n,
        )
        enc = PackedEncoder(
            self.model16,
            dtype=torch.bfloat16,
            **default_kernels(self.model16, torch.bfloat16),
        )
        self.run_packed(f"padding-free bf16 all Triton kernels, budget {best}", enc, best, n)

    def profile(self):
        """Where a forward's GPU time goes: each GEMM shape of a layer alone (its TFLOP/s is
        the ceiling for the encoder), then a kernel-time breakdown of one packed forward."""
        import torch.nn.functional as F
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        t = self.args.profile_tokens
        shapes = {"qkv": (1024, 3072), "attn_out": (1024, 1024), "ff_up": (1024, 4096)}
        shapes["ff_down"] = (4096, 1024)
        gemms, flops_all, sec_all = {}, 0.0, 0.0
        for name, (k, n) in shapes.items():
            a = torch.randn(t, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            sec = seconds_per_call(lambda a=a, w=w, b=b: F.linear(a, w, b))
            gemms[name] = {
                "ms": round(1e3 * sec, 3),
                "tflops": round(2 * t * k * n / sec / 1e12, 1),
            }
            flops_all += 2 * t * k * n
            sec_all += sec
            del a, w, b
        gemms["layer_all_four"] = {"tflops": round(flops_all / sec_all / 1e12, 1)}
        report = {"tokens": t, "gemm_fp16_alone": gemms, "forwards": {}}
        # One micro-batch of real rows, ~t tokens, as the scorer would cut it.
        n_rows = int(np.searchsorted(self.offsets, t, side="right")) - 1
        mb = (self.ids[: self.offsets[n_rows]], self.offsets[: n_rows + 1])
        cats = (  # first match wins: flash attention kernels also name cutlass types
            ("attention", ("flash", "fmha", "attn", "attention")),
            ("gemm", ("gemm", "cutlass", "sm90_", "sm100_", "xmma", "cublas", "nvjet")),
            ("add_layer_norm", ("layer_norm", "layernorm", "add_layer_norm")),
            ("gelu", ("gelu",)),
            ("embedding_index", ("index", "embedding", "gather", "scatter")),
            ("copy", ("memcpy", "copy")),
        )
        variants = {
            "eager": {},
            "fused_ln": {"fused_layer_norm": True},
            "fused_ln_gelu_epilogue": {"fused_layer_norm": True, "gelu_epilogue": True},
            "add_ln_attention": {**default_kernels(self.model16), "triton_gelu": False},
            "default": default_kernels(self.model16),
        }
        for label, kw in variants.items():
            enc = PackedEncoder(self.model16, **kw)
            reps = 5
            wall = seconds_per_call(lambda enc=enc: enc.score(*mb), reps=reps)
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    enc.score(*mb)
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():
                us = getattr(e, "self_device_time_total", 0) or 0
                if us > 0:
                    kernels[e.key] = kernels.get(e.key, 0) + us / reps / 1e3
            total = sum(kernels.values())
            by_cat = {}
            for key, ms in kernels.items():
                low = key.lower()
                cat = next((c for c, words in cats if any(w in low for w in words)), "other")
                by_cat[cat] = by_cat.get(cat, 0) + ms
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:14]
            report["forwards"][label] = {
                "rows": n_rows,
                "tokens": int(mb[1][-1]),
                "wall_ms": round(1e3 * wall, 2),
                "pairs_per_s": round(n_rows / wall, 1),
                "kernel_ms": round(total, 2),
                "by_category_ms": {k: round(v, 2) for k, v in sorted(by_cat.items())},
                "by_category_pct": {
                    k: round(100 * v / total, 1) for k, v in sorted(by_cat.items())
                },
                "top_kernels_ms": [[k[:120], round(v, 3)] for k, v in top],
            }
            print("profile", label, json.dumps(report["forwards"][label])[:1500], flush=True)
            del enc
        report["attention_alone"] = self._attention_probe(mb[1])
        report["kernels_alone"] = self._kernel_probe(mb[1])
        self.report["profile"] = report
        self.save()

    def _attention_probe(self, offsets):
        """One layer's attention for a micro-batch's lengths, alone: the varlen kernel the
        encoder uses vs. padded SDPA per backend (the micro-batch is length-sorted as the
        scorer cuts it, so padding is small), padding/unpadding copies included."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.varlen import varlen_attn

        lengths = np.sort(np.diff(offsets))
        off = np.concatenate(([0], np.cumsum(lengths)))
        n_tok, n_seq, max_len = int(off[-1]), len(lengths), int(lengths.max())
        cu = torch.tensor(off, device="cuda", dtype=torch.int32)
        qkv = torch.randn(n_tok, 3, 16, 64, device="cuda", dtype=torch.float16)
        q, k, v = qkv.unbind(1)
        row = torch.tensor(np.repeat(np.arange(n_seq), lengths), device="cuda")
        col = torch.tensor(np.arange(n_tok) - np.repeat(off[:-1], lengths), device="cuda")
        keep = (
            torch.arange(max_len, device="cuda")[None, :]
            < torch.tensor(lengths, device="cuda")[:, None]
        )

        out = {"tokens": n_tok, "rows": n_seq, "max_len": max_len}
        out["varlen_ms"] = ms_per_call(lambda: varlen_attn(q, k, v, cu, cu, max_len, max_len))

        def padded(backend, masked):
            def fn():
                pad = qkv.new_zeros(n_seq, max_len, 3, 16, 64)
                pad[row, col] = qkv
                pq, pk, pv = (pad[:, :, i].transpose(1, 2) for i in range(3))
                mask = keep[:, None, None, :] if masked else None
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)
                return o.transpose(1, 2)[row, col]

            return fn

        for name, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            for masked in (True, False):
                key = f"padded_{name}_{'masked' if masked else 'unmasked_lower_bound'}_ms"
                try:
                    out[key] = ms_per_call(padded(backend, masked))
                except Exception as e:  # a backend refusing these inputs is a result too
                    out[key] = f"{type(e).__name__}: {str(e)[:160]}"
        print("attention probe", out, flush=True)
        return out

    def _kernel_probe(self, offsets):
        """The Triton varlen attention alone against varlen_attn (FA2), on one micro-batch's
        lengths unsorted and length-sorted (the scorer sorts each block). (The probe of the
        exact-GELU matmul that was tried and dropped: results/2026-11-22-h200-tma-gemm-probe.)"""
        from torch.nn.attention.varlen import varlen_attn

        from rerank_ray.runners import kernels

        out = {"tokens": int(offsets[-1])}
        lengths = np.diff(offsets)
        for label, lens in (("unsorted", lengths), ("sorted", np.sort(lengths))):
            off = np.concatenate(([0], np.cumsum(lens)))
            n_tok, max_len = int(off[-1]), int(lens.max())
            cu = torch.tensor(off, device="cuda", dtype=torch.int32)
            qkv = torch.randn(n_tok, 3 * 1024, device="cuda", dtype=torch.float16)
            q, k, v = qkv.view(n_tok, 3, 16, 64).unbind(1)
            out[f"attn_{label}_fa2_ms"] = ms_per_call(
                lambda q=q, k=k, v=v, cu=cu, m=max_len: varlen_attn(q, k, v, cu, cu, m, m)
            )
            work = torch.from_numpy(kernels.attention_work(lens)).cuda()  # as the encoder stages it
            out[f"attn_{label}_triton_ms"] = ms_per_call(
                lambda qkv=qkv, cu=cu, work=work: kernels.varlen_attention(qkv, cu, 16, work=work)
            )
            ref = varlen_attn(q, k, v, cu, cu, max_len, max_len).reshape(n_tok, 1024)
            got = kernels.varlen_attention(qkv, cu, 16)
            out[f"attn_{label}_max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        print("kernel probe", out, flush=True)
        return out

    def hf_padded(self):
        ids, off = self.subset(self.args.hf_pairs)
        runner = HFPaddedRunner(self.model16)
        score_rows(runner, *self.subset(5000), TokenBudget(65536, 512), padded=True)
        _, sec, mem = timed(
            lambda: score_rows(runner, ids, off, TokenBudget(65536, 512), padded=True)
        )
        self.record("HF padded fp16, sorted, budget 65536", np.diff(off), sec, mem)

    def peers(self):
        n = self.args.peer_pairs
        pairs = self.work.texts(n)
        lengths = self.lengths[:n]
        path = self.saved_model_dir()
        try:
            from FlagEmbedding import FlagReranker

            rr = FlagReranker(path, use_fp16=True, batch_size=128, devices=["cuda:0"])
            rr.compute_score(pairs[:256])
            _, sec, mem = timed(lambda: rr.compute_score(pairs))
            self.record("FlagReranker fp16 (flagembedding 1.4.2), batch 128", lengths, sec, mem)
        except Exception:  # a peer failing must not lose the other figures
            self.report["errors"]["flagreranker"] = traceback.format_exc()[-2000:]
            print(self.report["errors"]["flagreranker"], flush=True)
        torch.cuda.empty_cache()
        try:
            from sentence_transformers import CrossEncoder

            ce = CrossEncoder(path, device="cuda", max_length=self.args.max_length)
            ce.model.half()
            ce.predict(pairs[:256], batch_size=32)
            _, sec, mem = timed(lambda: ce.predict(pairs, batch_size=32))
            self.record("sentence-transformers CrossEncoder fp16, batch 32", lengths, sec, mem)
        except Exception:  # a peer failing must not lose the other figures
            self.report["errors"]["crossencoder"] = traceback.format_exc()[-2000:]
            print(self.report["errors"]["crossencoder"], flush=True)
        torch.cuda.empty_cache()

    def job(self):
        """The whole Ray Data job (Parquet read -> tokenize -> score -> Parquet write) on a
        small and a large input in one Ray instance: the small run is mostly start-up
        (actor start, model load, autotune), the difference of the two is the steady rate."""
        import ray

        path = self.saved_model_dir()
        root = Path(tempfile.mkdtemp(prefix="job-"))
        small, large = self.args.job_small_pairs, self.args.job_pairs
        t0 = time.perf_counter()
        self.work.write_parquet(root / "small", small, shard_rows=50_000)
        self.work.write_parquet(root / "large", large, shard_rows=50_000)
        gen_s = time.perf_counter() - t0
        repo = str(Path(__file__).resolve().parent.parent)
        pythonpath = ":".join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        trace_dir = root / "trace"
        ray.init(
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            runtime_env={
                "env_vars": {"PYTHONPATH": pythonpath, "RERANK_RAY_TRACE_DIR": str(trace_dir)}
            },
        )
        runs = []
        try:
            variants = [
                (int(g), int(b), int(c), None if t == "default" else int(t), fg == "1")
                for g in self.args.job_gpus.split(",")
                for fg in self.args.job_fast_gelu.split(",")
                for b in self.args.job_batch_rows.split(",")
                for c in self.args.job_scorer_calls.split(",")
                for t in str(self.args.tokenize_actors).split(",")
            ]
            for gpus, batch_rows, calls, tok, fast_gelu in variants:
                walls = self._run_jobs(
                    root, path, small, large, batch_rows, calls, tok, gpus, fast_gelu
                )
                steady = (large - small) / (walls["large"] - walls["small"])
                runs.append(
                    {
                        "gpus": gpus,
                        "fast_gelu": fast_gelu,
                        "tokenize_actors": tok or f"default ({2 * gpus})",
                        "batch_rows": batch_rows,
                        "scorer_calls": calls,
                        "stages_in_large_run": trace_summary(trace_dir, walls["large_start"]),
                        "pairs_small": small,
                        "pairs_large": large,
                        "wall_small_s": round(walls["small"], 1),
                        "wall_large_s": round(walls["large"], 1),
                        "end_to_end_pairs_per_s": round(large / walls["large"], 1),
                        "steady_pairs_per_s": round(steady, 1),
                        "startup_s_estimate": round(walls["small"] - small / steady, 1),
                        "input_generation_s": round(gen_s, 1),
                    }
                )
                # The large run's report (HTML + PNGs) next to the bench JSON, for docs/.
                if walls.get("large_report"):
                    name = (
                        f"run-report-{gpus}gpu-b{batch_rows}-c{calls}-t{tok}-gelu{int(fast_gelu)}"
                    )
                    shutil.copytree(walls["large_report"], self.out / name, dirs_exist_ok=True)
                    runs[-1]["run_report"] = name
                print("job", runs[-1], flush=True)
                self.report["job"] = runs[0] if len(runs) == 1 else runs
                self.save()
        finally:
            ray.shutdown()

    def _run_jobs(
        self,
        root: Path,
        path: str,
        small: int,
        large: int,
        batch_rows: int,
        calls: int,
        tokenize_actors: int | None,
        gpus: int,
        fast_gelu: bool,
    ) -> dict:
        import rerank_ray

        walls = {}
        for name, n in (("small", small), ("large", large)):
            cfg = rerank_ray.JobConfig(
                input=str(root / name),
                output=str(
                    root / f"out-{name}-{batch_rows}-{calls}-{tokenize_actors}-{gpus}-{fast_gelu}"
                ),
                model=path,
                device="cuda",
                dtype="float16",
                tokenize_actors=tokenize_actors,
                num_actors=gpus,
                batch_rows=batch_rows,
                scorer_calls=calls,
                fast_gelu=fast_gelu,
            )
            walls[f"{name}_start"] = time.time()
            t0 = time.perf_counter()
            manifest = rerank_ray.run(cfg)
            walls[name] = time.perf_counter() - t0
            print("job", name, n, round(walls[name], 1), manifest.get("rows_scored"), flush=True)
            if manifest.get("report"):
                walls[f"{name}_report"] = str(Path(cfg.output, manifest["report"]).parent)
            if manifest.get("rows_scored") != n:
                raise RuntimeError(f"job scored {manifest.get('rows_scored')} of {n} rows")
        return walls

    def scaling(self):
        import ray

        path = self.saved_model_dir()
        n = self.args.scaling_pairs
        ids, off = self.subset(n)
        block = 4096
        blocks = [
            gather_rows(ids, off, np.arange(b0, min(b0 + block, n))) for b0 in range(0, n, block)
        ]
        repo = str(Path(__file__).resolve().parent.parent)
        pythonpath = ":".join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        ray.init(
            num_gpus=torch.cuda.device_count(),
            include_dashboard=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
        budget = self.report.get("autotune", {}).get("budget") or max(self.args.budgets)

        @ray.remote(num_gpus=1)
        class ScorerActor:
            def __init__(self, model_dir, budget):
                from transformers import AutoModelForSequenceClassification

                model = AutoModelForSequenceClassification.from_pretrained(
                    model_dir, dtype=torch.float16
                )
                self.enc = PackedEncoder(model.cuda().eval())
                self.budget = TokenBudget(budget, 512)
                score_rows(self.enc, *blocks_warm, self.budget)

            def score(self, ids_flat, offsets):
                return score_rows(self.enc, ids_flat, offsets, self.budget)

        blocks_warm = blocks[0]
        refs = [(ray.put(b[0]), ray.put(b[1])) for b in blocks]
        self.report["scaling"] = {"pairs": n, "budget": budget}
        for actors in sorted({1, torch.cuda.device_count()}):
            t0 = time.perf_counter()
            pool = [ScorerActor.remote(path, budget) for _ in range(actors)]
            ray.get([a.__ray_ready__.remote() for a in pool])
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = [pool[i % actors].score.remote(*refs[i]) for i in range(len(refs))]
            scores = np.concatenate(ray.get(outs))
            sec = time.perf_counter() - t0
            assert len(scores) == n
            self.report["scaling"][f"actors_{actors}"] = {
                "startup_s": round(startup, 1),
                "seconds": round(sec, 2),
                "pairs_per_s": round(n / sec, 1),
            }
            print("scaling", actors, self.report["scaling"][f"actors_{actors}"], flush=True)
            for a in pool:
                ray.kill(a)
            self.save()
        s = self.report["scaling"]
        if "actors_2" in s:
            s["speedup_2_vs_1"] = round(
                s["actors_2"]["pairs_per_s"] / s["actors_1"]["pairs_per_s"], 3
            )
        ray.shutdown()

    def chart(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.report["results"]
        if not rows:
            return
        names = [r["name"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(18, 0.5 * len(rows) + 2), sharey=True)
        for ax, key, label in zip(
            axes,
            ("pairs_per_s", "pct_of_matmul_peak", "peak_gpu_mem_gib"),
            ("pairs/s", "% of dense matmul peak (model FLOPs)", "peak GPU memory (GiB)"),
            strict=True,
        ):
            vals = [r[key] or 0 for r in rows]
            ax.barh(names, vals, color="tab:blue")
            ax.set_xlabel(label)
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:,.0f}" if v >= 10 else f" {v:.1f}", va="center", fontsize=8)
        axes[0].invert_yaxis()
        fig.suptitle(
            f"{self.report['device']}, {self.report['date'][:10]}: bge-reranker-v2-m3 arch, "
            f"{self.report['workload']['mean_tokens']:.0f} tokens/pair avg; matmul peak "
            f"{self.peak or 0:.0f} TFLOP/s"
        )
        fig.tight_layout()
        fig.savefig(self.out / "bench.png", dpi=110)


# What the scorer runs on a GPU by default (scorer.packed_runner with fused_kernels on).
def default_kernels(model, dtype=torch.float16) -> dict:
    """The kernel options the job's runner factory picks for ``model`` on this GPU."""
    return kernel_options(model.config, torch.device("cuda"), dtype, RunnerOptions())


def trace_summary(trace_dir: Path, since: float) -> dict:
    """Per stage, from the actors' call traces (rerank_ray.trace.CallTrace) of one run:
    calls, rows, the span from first call start to last call end, the time some call of the
    stage was running (union over actors and threads), and rows per second of that time;
    for each stage's actors, when the first process started and the last was set up."""
    calls: dict[str, list[dict]] = {}
    for file in Path(trace_dir).glob("*.jsonl"):
        for line in file.read_text().splitlines():
            rec = json.loads(line)
            if rec["start"] >= since:  # calls and actor set-ups of this run only
                calls.setdefault(rec["stage"], []).append(rec)
    out = {}
    for stage, recs in calls.items():
        if stage.endswith("_init"):  # actor set-up: when processes started and were ready
            starts = [r["process_start"] for r in recs if r.get("process_start")]
            steps = [r["setup_seconds"] for r in recs if r.get("setup_seconds")]
            out[stage] = {
                "actors": len(recs),
                "setup_steps_s": steps[:4],
                "first_process_start_after_s": round(min(starts) - since, 1) if starts else None,
                "setup_s_max": round(max(r["end"] - r["start"] for r in recs), 1),
                "last_ready_after_s": round(max(r["end"] for r in recs) - since, 1),
            }
            continue
        recs.sort(key=lambda r: r["start"])
        busy, cur_s, cur_e = 0.0, None, None
        for r in recs:
            if cur_e is None or r["start"] > cur_e:
                busy += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = r["start"], r["end"]
            else:
                cur_e = max(cur_e, r["end"])
        busy += cur_e - cur_s
        span = max(r["end"] for r in recs) - recs[0]["start"]
        rows = sum(r["rows"] for r in recs)
        out[stage] = {
            "actors": len({r["pid"] for r in recs}),
            "calls": len(recs),
            "rows": rows,
            "first_call_after_s": round(recs[0]["start"] - since, 1),
            "span_s": round(span, 1),
            "busy_s": round(busy, 1),
            "busy_fraction": round(busy / span, 3) if span else None,
            "call_seconds_sum": round(sum(r["end"] - r["start"] for r in recs), 1),
            "rows_per_busy_s": round(rows / busy, 1) if busy else None,
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for bench.json and bench.png.")
    p.add_argument("--sections", default=",".join(SECTIONS[:-1]), help=f"Any of {SECTIONS}.")
    p.add_argument("--pairs", type=int, default=200_000, help="Pairs generated.")
    p.add_argument("--packed-pairs", type=int, default=200_000)
    p.add_argument("--hf-pairs", type=int, default=40_000)
    p.add_argument("--peer-pairs", type=int, default=5_000)
    p.add_argument("--check-pairs", type=int, default=2_000)
    p.add_argument("--scaling-pairs", type=int, default=200_000)
    p.add_argument("--budgets", default="65536,131072")
    p.add_argument("--max-budget", type=int, default=65_536)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--profile-tokens", type=int, default=65_536)
    p.add_argument("--job-pairs", type=int, default=500_000)
    p.add_argument("--job-small-pairs", type=int, default=5_000)
    p.add_argument(
        "--tokenize-actors",
        default="default",
        help="Comma list: job runs per value; 'default' = the job's own (2 per scoring actor).",
    )
    p.add_argument("--job-batch-rows", default="2048", help="Comma list: job runs per value.")
    p.add_argument(
        "--job-scorer-calls", default="2", help="Comma list of scorer_calls: job runs per value."
    )
    p.add_argument(
        "--job-fast-gelu", default="0", help="Comma list of 0/1 (--fast-gelu): runs per value."
    )
    p.add_argument(
        "--job-gpus", default=None, help="Comma list of scoring actors (one GPU each); default all."
    )
    args = p.parse_args(argv)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if args.job_gpus is None:
        args.job_gpus = str(max(1, torch.cuda.device_count()))
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench = Bench(args)
    for section in SECTIONS:
        if section not in sections:
            continue
        t0 = time.perf_counter()
        try:
            getattr(bench, section)()
        except Exception:  # record and go on: one failing section must not lose the rest
            bench.report["errors"][section] = traceback.format_exc()[-3000:]
            print(bench.report["errors"][section], flush=True)
        bench.report.setdefault("section_seconds", {})[section] = round(time.perf_counter() - t0, 1)
        bench.save()
        bench.chart()  # after every section, so a run stopped at its time limit keeps one


if __name__ == "__main__":
    main()

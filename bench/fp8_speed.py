"""FP8 scorer speed on one Hopper GPU: fp16 (the default), bf16 and fp8 on the same micro-batches.

    PYTHONPATH=. python3 bench/fp8_speed.py --out "$OUT/fp8_speed.json"

One process, one GPU, under five minutes: builds the full-size bge-reranker-v2-m3
architecture (XLM-R large) with random weights, the bench workload (bench/workload.py,
``--pairs`` pairs) and scores it the way the scorer does (blocks of rows, length sort, the
production packer ``packing.token_budget_spans`` at ``--budget`` tokens, one micro-batch in
flight ahead: ``run_bench.score_rows``) with each runner, alternating, each timed ``--reps``
times. Runners: fp16 and bf16 with the kernels the factory picks (``kernel_options``); fp8
through the factory's own path (``fp8.from_model``: self-check, fused quantization, cuda
GEMMs, first and last layers bf16), with every layer in FP8, and with quantization as PyTorch
ops (unfused); and fp8 with fp16 instead of bf16 where this build's FP8 GEMM outputs fp16.

Also: the dense peaks (``torch._scaled_mm`` 8192^3 e4m3 with rowwise scales; fp16/bf16
``mm``), so the report gives % of the FP8 peak in the FLOPs each runner executes; peak GPU
memory per runner; fp16/bf16/fp8 against FP32 and fp8 against fp16 on the first
``--accuracy-pairs`` pairs (per-query Spearman, top-10 overlap, max |Δ|); the quantization
kernels alone in GB/s per launch variant (``quantization_kernels``); a torch.profiler
breakdown by kernel category of one fp8 forward and one fp16 forward. The JSON is rewritten
after every section, so a timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fp8_accuracy import compare  # noqa: E402
from bench.run_bench import score_rows, seconds_per_call  # noqa: E402
from bench.workload import encoder_flops, make_workload  # noqa: E402
from rerank_ray.backoff import TokenBudget  # noqa: E402
from rerank_ray.runners import RunnerOptions, fp8  # noqa: E402
from rerank_ray.runners.encoder import PackedEncoder  # noqa: E402
from rerank_ray.runners.packed import kernel_options  # noqa: E402
from rerank_ray.tiny_model import BGE_M3_SHAPE, xlmr_config  # noqa: E402

GIB = 2**30
CATEGORIES = (  # first match wins
    ("attention", ("varlen_attention", "flash", "fmha", "attn")),
    ("quantize rows (attention out, GELU)", ("rows_e4m3",)),
    ("add+LayerNorm (+e4m3)", ("add_layer_norm", "layer_norm")),
    ("gelu", ("gelu",)),
    ("gemm", ("gemm", "cutlass", "sm90_", "xmma", "cublas", "nvjet", "scaled_mm", "f8f8")),
    ("quantize (torch ops)", ("abs", "amax", "max", "clamp", "div", "mul", "_to_copy")),
    ("embedding/index", ("index", "embedding", "gather", "scatter")),
    ("copy", ("memcpy", "copy")),
)


def peaks() -> dict:
    """Dense TFLOP/s at 8192^3: e4m3 rowwise-scaled ``_scaled_mm`` (bf16 out), fp16/bf16 mm."""
    n = 8192
    out = {}
    a16 = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b16 = torch.randn(n, n, device="cuda", dtype=torch.float16)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = a16.to(dtype), b16.to(dtype)
        sec = seconds_per_call(lambda a=a, b=b: a @ b)
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / sec / 1e12
    x, w = fp8.quantize_rows(a16), fp8.quantize_weight(b16)
    sec = seconds_per_call(
        lambda: torch._scaled_mm(
            x.q, w.q.t(), scale_a=x.scale, scale_b=w.scale, out_dtype=torch.bfloat16
        )
    )
    out["e4m3 rowwise, bf16 out"] = 2 * n**3 / sec / 1e12
    return {k: round(v, 1) for k, v in out.items()}


def quantization_kernels(tokens: int = 65_536) -> dict:
    """The FP8 quantization passes alone at one forward's shapes (``tokens`` x 1024 for
    add+LayerNorm and the attention output, x 4096 for GELU), in GB/s against a device copy,
    with the e4m3 rounding done by the GPU's conversion (the runner's) or in integer
    arithmetic (the interpreter's), and the launch's warps varied."""
    from rerank_ray.runners import kernel_sources as src
    from rerank_ray.runners import kernels

    dt = torch.bfloat16
    x4 = torch.randn(tokens, 4096, device="cuda", dtype=dt)
    x1, r1 = (torch.randn(tokens, 1024, device="cuda", dtype=dt) for _ in range(2))
    w, b = torch.randn(1024, device="cuda", dtype=dt), torch.randn(1024, device="cuda", dtype=dt)
    copy_s = seconds_per_call(lambda: x4.clone())
    out = {"copy_gb_per_s": round(2 * x4.numel() * 2 / copy_s / 1e9, 1)}
    for hardware in (True, False):
        e4m3 = src.store_e4m3_row(hardware=hardware)
        for warps in (2, 4, 8):
            for name, x, gelu in (("gelu+e4m3 x4096", x4, True), ("e4m3 x1024", x1, False)):
                q = torch.empty(x.shape, device="cuda", dtype=torch.float8_e4m3fn)
                sc = torch.empty((x.shape[0], 1), device="cuda", dtype=torch.float32)
                sec = seconds_per_call(
                    lambda x=x, q=q, sc=sc, gelu=gelu, e4m3=e4m3, warps=warps: src.rows_e4m3_kernel()[
                        (x.shape[0],)
                    ](x, q, sc, x.stride(0), x.shape[1], BLOCK=x.shape[1], GELU=gelu,
                      GELU_F32=src.gelu_f32(), E4M3=e4m3, num_warps=warps)
                )  # fmt: skip
                key = f"{name}, {'hw' if hardware else 'int'} rounding, {warps} warps"
                out[key] = {
                    "ms": round(sec * 1e3, 3),
                    "gb_per_s": round(x.numel() * 3 / sec / 1e9, 1),
                }
            q = torch.empty(x1.shape, device="cuda", dtype=torch.float8_e4m3fn)
            sc = torch.empty((tokens, 1), device="cuda", dtype=torch.float32)
            y = x1.clone()
            sec = seconds_per_call(
                lambda y=y, q=q, sc=sc, e4m3=e4m3, warps=warps: src.add_layer_norm_kernel()[(tokens,)](
                    y, r1, w, b, q, sc, y.stride(0), 1024, 1e-5,
                    BLOCK=1024, QUANT=True, E4M3=e4m3, num_warps=warps)
            )  # fmt: skip
            key = f"add+LN+e4m3 x1024, {'hw' if hardware else 'int'} rounding, {warps} warps"
            out[key] = {"ms": round(sec * 1e3, 3), "gb_per_s": round(x1.numel() * 7 / sec / 1e9, 1)}
    sec = seconds_per_call(lambda: kernels.gelu_(x4))
    out["gelu_ x4096 (16-bit, in place)"] = {
        "ms": round(sec * 1e3, 3), "gb_per_s": round(x4.numel() * 4 / sec / 1e9, 1)
    }  # fmt: skip
    return out


def profile_forward(runner, ids, offsets, reps: int = 3) -> dict:
    """GPU kernel time of one forward by category (ms), and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    runner.score(ids, offsets)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            runner.score(ids, offsets)
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us > 0:
            kernels[e.key] = kernels.get(e.key, 0) + us / reps / 1e3
    by_cat: dict[str, float] = {}
    for key, ms in kernels.items():
        low = key.lower()
        cat = next((c for c, words in CATEGORIES if any(w in low for w in words)), "other")
        by_cat[cat] = by_cat.get(cat, 0) + ms
    total = sum(kernels.values())
    return {
        "tokens": int(offsets[-1]),
        "rows": len(offsets) - 1,
        "gpu_ms": round(total, 2),
        "by_category_ms": {k: round(v, 2) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k[:120]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--budget", type=int, default=65_536)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--accuracy-pairs", type=int, default=2_000)
    parser.add_argument("--unfused-pairs", type=int, default=12_000)
    args = parser.parse_args()
    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        raise SystemExit("fp8_speed.py needs a CUDA GPU.")
    dev = torch.device("cuda")
    report: dict = {
        "what": "FP8 vs fp16/bf16 scorer, full-size bge-reranker-v2-m3 architecture, random weights",
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(dev),
        "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "pairs": args.pairs,
        "budget": args.budget,
        "errors": {},
    }

    def save() -> None:
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # record and go on: one failed section must not lose the others
            report["errors"][name] = traceback.format_exc()[-3000:]
        print(f"[{time.perf_counter() - t_start:6.1f} s] {name}: {report.get(name)}", flush=True)
        report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        save()

    section("peak_tflops", peaks)
    section("quantization_kernels", quantization_kernels)
    torch.cuda.empty_cache()

    from transformers import XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = XLMRobertaForSequenceClassification(xlmr_config(**BGE_M3_SHAPE))
    model = model.half().eval()
    cfg = model.config
    wl = make_workload(args.pairs, docs_per_query=100)
    ids, offsets = wl.tokenized()
    lengths = np.diff(offsets)
    flops = encoder_flops(lengths, 1024, 4096, 24, first_token_last_layer=True)
    report["workload"] = {"tokens_per_pair": round(float(lengths.mean()), 1), "tflop": flops / 1e12}

    opts16 = RunnerOptions()
    runners = {}

    weights_gib: dict[str, float] = {}

    def build():
        def built(name, make):  # the runner, and the GPU memory its own weights take
            before = torch.cuda.memory_allocated()
            runners[name] = make()
            weights_gib[name] = round((torch.cuda.memory_allocated() - before) / GIB, 3)

        half = kernel_options(cfg, dev, torch.float16, opts16)
        bf = kernel_options(cfg, dev, torch.bfloat16, opts16)
        built("fp16", lambda: PackedEncoder(model, dtype=torch.float16, **half))
        built("bf16", lambda: PackedEncoder(model, dtype=torch.bfloat16, **bf))
        fp8_opts = RunnerOptions(precision="fp8")
        built("fp8", lambda: fp8.from_model(model, dev, torch.bfloat16, fp8_opts))
        chosen = fp8.fp8_options(cfg, dev, torch.bfloat16, fp8_opts)
        built(
            "fp8, every layer",
            lambda: fp8.Fp8Encoder(model, dtype=torch.bfloat16, **{**chosen, "layers_16bit": ()}),
        )
        built(
            "fp8, quantization as torch ops",
            lambda: fp8.Fp8Encoder(
                model, dtype=torch.bfloat16, **{**chosen, "fused_quantization": False}
            ),
        )
        return {
            "fp16": half,
            "bf16": bf,
            "fp8": {k: str(v) for k, v in chosen.items()},
            "runner_weights_gib (beyond the fp16 HF model)": weights_gib,
        }

    section("kernel_options", build)
    try:  # after the accuracy of the others: its own section below if it builds
        runners["fp8, fp16 rest"] = fp8.from_model(
            model, dev, torch.float16, RunnerOptions(precision="fp8", dtype="float16")
        )
    except ValueError as e:  # rowwise FP8 GEMMs may not output fp16 on this build
        report["errors"]["fp8, fp16 rest"] = str(e)

    n_acc = min(args.accuracy_pairs, args.pairs)
    acc_ids, acc_off = ids[: offsets[n_acc]], offsets[: n_acc + 1]
    group = wl.query_of_pair[:n_acc]
    scores: dict[str, np.ndarray] = {}

    def accuracy():
        ref = PackedEncoder(model, dtype=torch.float32, attention="sdpa")
        want = score_rows(ref, acc_ids, acc_off, TokenBudget(16_384, 512)).astype(np.float64)
        del ref
        torch.cuda.empty_cache()
        out = {}
        for name, runner in list(runners.items()):
            try:
                got = score_rows(runner, acc_ids, acc_off, TokenBudget(args.budget, 512))
            except Exception:  # a runner that cannot score here is reported, not timed
                report["errors"][name] = traceback.format_exc()[-3000:]
                del runners[name]
                continue
            scores[name] = got.astype(np.float64)
            out[f"{name} vs fp32"] = compare(want, scores[name], group)
        for name in runners:
            if name.startswith("fp8"):
                out[f"{name} vs fp16"] = compare(scores["fp16"], scores[name], group)
        out["fp32_logit_std"] = round(float(want.std()), 4)
        return out

    section("accuracy", accuracy)

    def speed():
        # peak_gib: the most GPU memory a run held beyond what was allocated before it (every
        # runner's weights and the HF model stay resident), i.e. a forward's working memory.
        rows = {name: {"seconds": [], "peak_gib": 0.0} for name in runners}
        for runner in runners.values():  # warm-up: compile, autotune caches
            score_rows(runner, ids[: offsets[512]], offsets[:513], TokenBudget(args.budget, 512))
        for _ in range(args.reps):
            for name, runner in runners.items():
                n = args.unfused_pairs if "torch ops" in name else args.pairs
                n = min(n, args.pairs)
                sub_ids, sub_off = ids[: offsets[n]], offsets[: n + 1]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                score_rows(runner, sub_ids, sub_off, TokenBudget(args.budget, 512))
                torch.cuda.synchronize()
                rows[name]["seconds"].append(time.perf_counter() - t0)
                rows[name]["pairs"] = n
                rows[name]["peak_gib"] = max(
                    rows[name]["peak_gib"], (torch.cuda.max_memory_allocated() - resident) / GIB
                )
        peak8 = report.get("peak_tflops", {}).get("e4m3 rowwise, bf16 out")
        peak16 = report.get("peak_tflops", {}).get("float16")
        for r in rows.values():
            best = min(r["seconds"])
            n = r["pairs"]
            tflops = encoder_flops(lengths[:n], 1024, 4096, 24, first_token_last_layer=True)
            tflops /= best * 1e12
            r.update(
                pairs_per_s=round(n / best, 1),
                pairs_per_s_all=[round(n / s, 1) for s in r["seconds"]],
                tflops=round(tflops, 1),
                pct_fp8_peak=round(100 * tflops / peak8, 1) if peak8 else None,
                pct_fp16_peak=round(100 * tflops / peak16, 1) if peak16 else None,
                peak_gib=round(r["peak_gib"], 2),
                seconds=[round(s, 2) for s in r["seconds"]],
            )
        base = rows["fp16"]["pairs_per_s"]
        for r in rows.values():
            r["speed_vs_fp16"] = round(r["pairs_per_s"] / base, 3)
        return rows

    section("speed", speed)

    def profiles():
        n = int(np.searchsorted(offsets, args.budget, side="right")) - 1
        mb = (ids[: offsets[n]], offsets[: n + 1])
        return {name: profile_forward(runners[name], *mb) for name in ("fp8", "fp16")}

    section("profile_one_forward", profiles)
    print(json.dumps(report.get("speed"), indent=1))


if __name__ == "__main__":
    main()

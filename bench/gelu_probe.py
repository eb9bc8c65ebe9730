"""Probe: ways to pay less for the exact (erf) GELU after the feed-forward up-projection
(65k x 1024 -> 4096, fp16), against cuBLAS bias-only and cuBLAS + PyTorch's in-place GELU.

    PYTHONPATH=. python3 bench/gelu_probe.py --out "$OUT"

- a Triton in-place elementwise GELU with libdevice's erf and with a cheaper erf
  (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7);
- cuDNN's fused matmul + bias + GELU_FWD (the erf form) graph, through the cuDNN frontend
  (``nvidia-cudnn-frontend``), if importable.
Writes ``gelu_probe.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F


def _triton_gelu():
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_kernel(X, Y, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        z = h * 0.7071067811865476
        if FAST:
            s = tl.abs(z)
            t = 1.0 / (1.0 + 0.3275911 * s)
            poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                   + t * (-1.453152027 + t * 1.061405429))))  # fmt: skip
            erfc = poly * tl.exp2(-1.4426950408889634 * s * s)
            erf = tl.where(z >= 0, 1.0 - erfc, erfc - 1.0)
        else:
            erf = tl.math.erf(z)
        tl.store(Y + offs, (0.5 * h * (1.0 + erf)).to(Y.dtype.element_ty), mask=mask)

    def gelu(x, fast, block=4096, warps=8, out=None):
        """Into ``out`` (``x`` itself when None: in place)."""
        out = x if out is None else out
        n = x.numel()
        grid = (triton.cdiv(n, block),)
        gelu_kernel[grid](x, out, n, FAST=fast, BLOCK=block, num_warps=warps)
        return out

    return gelu


def _cudnn_linear_gelu(x, w, b, report):
    import cudnn

    report["cudnn_frontend"] = getattr(cudnn, "__version__", "?")
    report["cudnn_backend"] = (
        int(cudnn.backend_version()) if hasattr(cudnn, "backend_version") else None
    )
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(1, m, n, device="cuda", dtype=torch.float16)
    a3, b3, bias3 = x.view(1, m, k), w.t().view(1, k, n), b.view(1, 1, n)
    g = cudnn.pygraph(
        io_data_type=cudnn.data_type.HALF,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    A = g.tensor_like(a3)
    B = g.tensor_like(b3)
    BIAS = g.tensor_like(bias3)
    C = g.matmul(A, B, name="mm")
    D = g.bias(input=C, bias=BIAS, name="bias")
    E = g.gelu(input=D, name="gelu")
    E.set_output(True).set_data_type(cudnn.data_type.HALF)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    try:
        g.build_plans(cudnn.build_plan_policy.ALL)
    except Exception:  # noqa: BLE001 (older frontends: heuristics' choice only)
        g.build_plans()
    report["cudnn_plans"] = g.get_execution_plan_count()
    sizes = [g.get_workspace_size_plan_at_index(i) for i in range(report["cudnn_plans"])]
    ws = torch.empty(max(1, g.get_workspace_size(), *sizes), device="cuda", dtype=torch.uint8)
    variant = {A: a3, B: b3, BIAS: bias3, E: out}
    from triton.testing import do_bench

    per_plan = {}
    for i in range(report["cudnn_plans"]):
        try:
            g.execute_plan_at_index(variant, ws, i, handle=handle)
            torch.cuda.synchronize()
            err = float((out.view(m, n).float() - F.gelu(F.linear(x, w, b)).float()).abs().max())
            ms = do_bench(lambda i=i: g.execute_plan_at_index(variant, ws, i, handle=handle))
            per_plan[str(i)] = {"ms": round(ms, 4), "max_abs_vs_eager": err}
        except Exception as e:  # noqa: BLE001
            per_plan[str(i)] = f"{type(e).__name__}: {str(e)[:200]}"
        print("cudnn plan", i, per_plan[str(i)], flush=True)
    report["cudnn_per_plan"] = per_plan

    def run():
        g.execute(variant, ws, handle=handle)
        return out.view(m, n)

    try:
        names = [g.get_plan_name_at_index(i) for i in range(report["cudnn_plans"])]
        report["cudnn_plan_names"] = names[:20]
    except Exception as e:  # noqa: BLE001 (names are informative only)
        report["cudnn_plan_names"] = f"{type(e).__name__}: {e}"
    return run, g, variant, ws, handle


def up_projection(tokens: int):
    """The case both GELU probes time: x [tokens, 1024] @ w [4096, 1024]^T + b in fp16 (seeded),
    with the eager fp16 ``gelu(x @ w^T + b)`` and its fp32 counterpart as references."""
    torch.manual_seed(0)
    m, k, n = tokens, 1024, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = (torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5).contiguous()
    b = torch.randn(n, device="cuda", dtype=torch.float16) * 0.1
    ref = F.gelu(F.linear(x, w, b))
    ref32 = F.gelu(F.linear(x.float(), w.float(), b.float()))
    return x, w, b, ref, ref32


def recorder(report: dict, ref: torch.Tensor, ref32: torch.Tensor):
    """``record(name, fn, y=None, want=ref, want32=ref32)``: checks ``fn``'s output (or ``y``,
    for an in-place ``fn``) against the references, times ``fn`` with ``do_bench`` (L2
    flushed), into ``report``'s ``ms``/``max_abs_vs_eager``/``max_abs_vs_fp32``/``errors``."""
    from triton.testing import do_bench

    def record(name, fn, y=None, want=ref, want32=ref32):
        try:
            y = fn() if y is None else y
            torch.cuda.synchronize()
            report["max_abs_vs_eager"][name] = float((y.float() - want.float()).abs().max())
            report["max_abs_vs_fp32"][name] = float((y.float() - want32).abs().max())
            report["ms"][name] = round(do_bench(fn, warmup=50, rep=300), 4)
        except Exception as e:  # noqa: BLE001 (a failing variant is a result too)
            report["errors"][name] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc(limit=3)
        print(name, report["ms"].get(name), report["errors"].get(name), flush=True)

    return record


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=65487)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import triton

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn_in_torch": torch.backends.cudnn.version(),
        "shape": {"M": args.tokens, "K": 1024, "N": 4096},
        "ms": {},
        "max_abs_vs_eager": {},
        "max_abs_vs_fp32": {},
        "errors": {},
    }
    x, w, b, ref, ref32 = up_projection(args.tokens)
    pre = F.linear(x, w, b)
    record = recorder(report, ref, ref32)

    record("cublas_bias_only", lambda: F.linear(x, w, b), y=ref)
    record("cublas_bias_then_torch_gelu_", lambda: torch.ops.aten.gelu_(F.linear(x, w, b)))
    record("cublas_tanh_epilogue", lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    # The elementwise pass alone, out of place (same traffic as in place, fresh input each call).
    buf = torch.empty_like(pre)
    record("torch_gelu_alone", lambda: F.gelu(pre))
    gelu = _triton_gelu()
    for fast in (False, True):
        erf = "fast" if fast else "libdevice"
        for block, warps in ((1024, 4), (4096, 8), (8192, 8)):
            record(
                f"triton_gelu_{erf}_erf_alone_b{block}_w{warps}",
                lambda fast=fast, block=block, warps=warps: gelu(pre, fast, block, warps, out=buf),
            )
        record(
            f"cublas_bias_then_triton_gelu_{erf}_inplace",
            lambda fast=fast: gelu(F.linear(x, w, b), fast),
        )
    try:
        run, *_keep = _cudnn_linear_gelu(x, w, b, report)
        record("cudnn_matmul_bias_gelu", run)
    except Exception as e:  # noqa: BLE001
        report["errors"]["cudnn_matmul_bias_gelu"] = f"{type(e).__name__}: {str(e)[:600]}"
        traceback.print_exc()
    (out / "gelu_probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

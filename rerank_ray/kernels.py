"""Fused residual add + LayerNorm (Triton) for the padding-free encoder.

Each encoder layer ends its attention and its feed-forward block with ``LayerNorm(y + x)``.
Eagerly that is two kernels and five passes over a ``tokens x hidden`` tensor (add: read two,
write one; LayerNorm: read one, write one); this kernel reads ``y`` and ``x`` once and writes
the result over ``y``: three passes. Numerics follow the eager pair: the sum is rounded to the
input dtype first (as the fp16/bf16 add does), then normalized in float32.
(An in-place exact-GELU kernel was tried too and measured slower than PyTorch's own on an
H200: 10.4 vs 9.4 ms per 64k-token forward, bench/results/2026-11-22-h200-fused-kernels.json.)

Triton is the compiler PyTorch's CUDA builds ship with; where it is missing (CPU-only
installs) ``available()`` is False and the encoder keeps the eager pair. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (how the tests check it here).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_layer_norm_kernel(Y, X, W, B, stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(Y + row * stride + cols, mask=mask, other=0.0)
        x = tl.load(X + row * stride + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first, as the eager fp16/bf16 add does.
        s = (y.to(tl.float32) + x.to(tl.float32)).to(y.dtype).to(tl.float32)
        mean = tl.sum(s, axis=0) / n_cols
        d = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride + cols, (d * rstd * w + b).to(y.dtype), mask=mask)

    return add_layer_norm_kernel, triton.next_power_of_2


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device``: Triton importable, and CUDA (or CPU
    under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def add_layer_norm_(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(y + x)`` over the last dim, written into ``y`` (returned). 2-D inputs of
    the same shape, dtype and row stride; ``y`` is overwritten."""
    if y.dim() != 2 or y.shape != x.shape or y.stride() != x.stride() or y.stride(1) != 1:
        raise ValueError(
            f"add_layer_norm_ needs two row-major 2-D tensors of one shape, got "
            f"{tuple(y.shape)}/{y.stride()} and {tuple(x.shape)}/{x.stride()}."
        )
    rows, cols = y.shape
    if rows == 0:
        return y
    kernel, next_pow2 = _kernel()
    block = next_pow2(cols)
    warps = 4 if block <= 1024 else 8
    kernel[(rows,)](y, x, weight, bias, y.stride(0), cols, eps, BLOCK=block, num_warps=warps)
    return y


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel once on a small input and compare with eager PyTorch; None when they
    agree, else why not (a Triton that cannot compile for this GPU, a wrong result). The
    scorer calls it at actor start and keeps the eager ops when it fails."""
    import torch.nn.functional as F

    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        y, x = (torch.randn(64, 96, generator=gen).to(device, dtype) for _ in range(2))
        w, b = (torch.randn(96, generator=gen).to(device, dtype) for _ in range(2))
        want = F.layer_norm((y + x).float(), (96,), w.float(), b.float(), 1e-5)
        got = add_layer_norm_(y.clone(), x, w, b, 1e-5).float()
    except Exception as e:  # compile or launch failure: report it, the caller falls back
        return f"{type(e).__name__}: {e}"
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    err = (got - want).abs().max().item()
    if not err <= tol:
        return f"the fused add+LayerNorm kernel differs from eager PyTorch by {err:.3g} (> {tol}) in {dtype}"
    return None

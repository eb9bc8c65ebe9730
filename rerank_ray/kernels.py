"""Triton kernels for the padding-free encoder: the elementwise work fused around the matmuls.

- ``add_layer_norm_``: each encoder layer ends its attention and its feed-forward block with
  ``LayerNorm(y + x)``. Eagerly that is two kernels and five passes over a ``tokens x hidden``
  tensor; this kernel reads ``y`` and ``x`` once and writes the result over ``y``. The sum is
  rounded to the input dtype first (as the fp16/bf16 add does), then normalized in float32.
- ``linear_gelu``: the feed-forward up-projection with its bias and the *exact* (erf) GELU in
  the matmul's epilogue, so the ``tokens x 4*hidden`` activation is written once instead of
  written, read and written again. cuBLASLt's GELU epilogue is the tanh approximation only
  (``--fast-gelu``); this keeps HF's numerics: the biased product is rounded to the input dtype
  as the eager ``F.linear`` output is, then GELU in float32, as eager ``F.gelu`` does.
- ``varlen_attention``: flash attention over packed sequences (cu_seqlens) that reads q, k and
  v straight from the fused QKV projection's output, tiled for short sequences (a reranking
  pair is ~100-500 tokens). Softmax in float32 with the running max, P rounded to the input
  dtype for the PV product: FlashAttention's numerics.

(An in-place exact-GELU elementwise kernel was tried too and measured slower than PyTorch's own
on an H200: 10.4 vs 9.4 ms per 64k-token forward, bench/results/2026-11-22-h200-fused-kernels.json.)

Triton is the compiler PyTorch's CUDA builds ship with; where it is missing (CPU-only
installs) ``available()`` is False and the encoder keeps the eager ops. Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (how the tests check them here).
"""

from __future__ import annotations

import functools
import math
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _size_class(n: int) -> int:
    """Autotune key for a token count: tuned once per power-of-two class from 4k up to 256k
    (the first micro-batches of an actor are small probes; the steady ones are large)."""
    return max(0, min(int(n).bit_length() - 12, 6))


def _length_class(max_len: int) -> int:
    """Autotune key for the longest sequence of a micro-batch: <64, <128, <256, <512, more."""
    return max(0, min(int(max_len).bit_length() - 6, 4))


@functools.cache
def _linear_gelu_kernel():
    import triton
    import triton.language as tl

    if _interpreting():  # one small tile: the interpreter runs every config it is given
        configs = [triton.Config({"BM": 32, "BN": 32, "BK": 16, "GROUP_M": 4})]
    else:  # Hopper/Ampere fp16 GEMM tiles (Triton's matmul tutorial), tuned per shape class
        configs = [
            triton.Config({"BM": bm, "BN": bn, "BK": 64, "GROUP_M": 8}, num_stages=st, num_warps=w)
            for bm, bn, st, w in (
                (128, 256, 3, 8),
                (256, 128, 3, 8),
                (128, 128, 4, 8),
                (128, 128, 4, 4),
                (128, 256, 4, 8),
                (64, 256, 4, 4),
            )
        ]

    @triton.autotune(configs=configs, key=["N", "K", "M_CLASS"])
    @triton.jit
    def linear_gelu_kernel(
        X, W, B, C, M, N, K, M_CLASS, stride_xm, stride_wn, stride_cm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BM)
        grid_n = tl.cdiv(N, BN)
        in_group = GROUP_M * grid_n  # grouped order: neighbouring programs share X rows in L2
        first_m = (pid // in_group) * GROUP_M
        group_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        # Wrapped indices keep the K loop free of masks; the store masks the overhang.
        rm = tl.max_contiguous(tl.multiple_of(offs_m % M, BM), BM).to(tl.int64)
        rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BN), BN).to(tl.int64)
        ks = tl.arange(0, BK)
        x_ptrs = X + rm[:, None] * stride_xm + ks[None, :]
        w_ptrs = W + rn[None, :] * stride_wn + ks[:, None]  # W is [N, K]: read as W^T tiles
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, K, BK):  # K % BK == 0 (checked by the caller)
            acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
            x_ptrs += BK
            w_ptrs += BK
        bias = tl.load(B + rn).to(tl.float32)
        # Round the biased product as eager F.linear's output is, then GELU in float32.
        h = (acc + bias[None, :]).to(C.dtype.element_ty).to(tl.float32)
        g = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(
            c_ptrs, g.to(C.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N)
        )

    return linear_gelu_kernel, triton.cdiv


def linear_gelu_supported(in_features: int, out_features: int) -> bool:
    """Shapes the GELU matmul takes: whole 64-wide K steps (no masks in its inner loop)."""
    return in_features % 64 == 0 and out_features % 16 == 0


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact GELU) as one matmul with the bias and GELU
    in its epilogue. ``x`` [M, K] and ``weight`` [N, K] row-major, ``bias`` [N], one dtype."""
    if (
        x.dim() != 2
        or weight.dim() != 2
        or x.shape[1] != weight.shape[1]
        or bias.shape != (weight.shape[0],)
        or x.stride(1) != 1
        or not weight.is_contiguous()
        or not bias.is_contiguous()
        or not x.dtype == weight.dtype == bias.dtype
    ):
        raise ValueError(
            f"linear_gelu needs x [M, K] and weight [N, K] row-major and bias [N] of one dtype, "
            f"got {tuple(x.shape)}/{x.stride()} {x.dtype}, {tuple(weight.shape)} {weight.dtype}, "
            f"{tuple(bias.shape)} {bias.dtype}."
        )
    (m, k), n = x.shape, weight.shape[0]
    if not linear_gelu_supported(k, n):
        raise ValueError(
            f"linear_gelu needs in_features % 64 == 0 and out_features % 16 == 0, got {k} and {n}."
        )
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    kernel, cdiv = _linear_gelu_kernel()

    def grid(meta):
        return (cdiv(m, meta["BM"]) * cdiv(n, meta["BN"]),)

    kernel[grid](
        x, weight, bias, out, m, n, k, _size_class(m), x.stride(0), weight.stride(0), out.stride(0)
    )
    return out


@functools.cache
def _attention_kernel():
    import triton
    import triton.language as tl

    if _interpreting():
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    else:
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=w)
            for bm, bn, st, w in (
                (64, 64, 2, 4),
                (64, 64, 3, 4),
                (128, 64, 2, 4),
                (128, 64, 3, 8),
                (64, 128, 2, 4),
                (128, 128, 2, 8),
            )
        ]

    @triton.autotune(configs=configs, key=["HEADS", "D", "LEN_CLASS"])
    @triton.jit
    def varlen_attention_kernel(
        QKV, OUT, CU, qk_scale, stride_qkv, stride_o, LEN_CLASS,
        HEADS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        start = tl.load(CU + seq)
        length = tl.load(CU + seq + 1) - start
        if m_block * BLOCK_M >= length:  # the grid covers the longest sequence of the batch
            return
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        base = QKV + start.to(tl.int64) * stride_qkv + head * D
        q = tl.load(
            base + offs_m[:, None] * stride_qkv + offs_d[None, :],
            mask=offs_m[:, None] < length,
            other=0.0,
        )
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        for n0 in range(0, length, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < length
            kt = tl.load(  # K^T tile [D, BLOCK_N]: k sits HEADS*D after q in each QKV row
                base + HEADS * D + offs_n[None, :] * stride_qkv + offs_d[:, None],
                mask=valid[None, :],
                other=0.0,
            )
            s = tl.dot(q, kt) * qk_scale  # log2 units: softmax through exp2
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                base + 2 * HEADS * D + offs_n[:, None] * stride_qkv + offs_d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = (
            OUT + (start + offs_m[:, None]).to(tl.int64) * stride_o + head * D + offs_d[None, :]
        )
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < length)

    return varlen_attention_kernel, triton.cdiv


def attention_supported(head_dim: int) -> bool:
    """Head sizes the attention kernel takes (a power of two the matmul units tile)."""
    return head_dim in (16, 32, 64, 128)


def varlen_attention(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, heads: int
) -> torch.Tensor:
    """Softmax attention within each packed sequence, no mask beyond the sequence bounds.

    ``qkv`` is the fused projection's output, [tokens, 3 * heads * head_dim] row-major (q, k, v
    blocks of ``heads * head_dim`` each); ``cu_seqlens`` int32 [B + 1], starting at 0;
    ``max_len`` the longest sequence. Returns [tokens, heads * head_dim]."""
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] % (3 * heads):
        raise ValueError(
            f"varlen_attention needs qkv [tokens, 3 * heads * head_dim] row-major with "
            f"heads={heads}, got {tuple(qkv.shape)}/{qkv.stride()}."
        )
    tokens, width = qkv.shape[0], qkv.shape[1] // 3
    head_dim = width // heads
    if not attention_supported(head_dim):
        raise ValueError(f"varlen_attention takes head_dim 16, 32, 64 or 128, got {head_dim}.")
    out = torch.empty((tokens, width), device=qkv.device, dtype=qkv.dtype)
    n_seq = cu_seqlens.shape[0] - 1
    if tokens == 0 or n_seq == 0:
        return out
    kernel, cdiv = _attention_kernel()
    scale = 1.4426950408889634 / math.sqrt(head_dim)  # log2(e) / sqrt(d)

    def grid(meta):
        return (cdiv(max_len, meta["BLOCK_M"]), n_seq, heads)

    kernel[grid](
        qkv, out, cu_seqlens, scale, qkv.stride(0), out.stride(0), _length_class(max_len),
        HEADS=heads, D=head_dim,
    )  # fmt: skip
    return out


def self_check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """Run each kernel once on a small input and compare with eager PyTorch: add+LayerNorm,
    the GELU matmul, and (given a supported ``head_dim``) the attention. None when they all
    agree, else why not (a Triton that cannot compile for this GPU, a wrong result). The
    scorer calls it at actor start and keeps the eager ops when it fails."""
    import torch.nn.functional as F

    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    checks = []
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

        y, x, w, b = randn(64, 96), randn(64, 96), randn(96), randn(96)
        want = F.layer_norm((y + x).float(), (96,), w.float(), b.float(), 1e-5)
        got = add_layer_norm_(y.clone(), x, w, b, 1e-5).float()
        checks.append(("add+LayerNorm", got, want, tol))

        x, w, b = randn(80, 128), randn(96, 128, scale=0.1), randn(96)
        want = F.gelu(F.linear(x.float(), w.float(), b.float()))
        got = linear_gelu(x, w, b).float()
        checks.append(("linear+GELU", got, want, 2 * tol))

        if head_dim is not None and attention_supported(head_dim):
            heads, lengths = 2, (3, 70, 130)
            cu = torch.tensor((0, 3, 73, 203), dtype=torch.int32, device=device)
            qkv = randn(203, 3 * heads * head_dim)
            got = varlen_attention(qkv, cu, max(lengths), heads).float()
            parts = []
            for start, n in zip((0, 3, 73), lengths, strict=True):
                q, k, v = qkv[start : start + n].float().view(n, 3, heads, head_dim).unbind(1)
                o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)))
                parts.append(o.transpose(0, 1).reshape(n, heads * head_dim))
            checks.append(("varlen attention", got, torch.cat(parts), tol))
    except Exception as e:  # compile or launch failure: report it, the caller falls back
        return f"{type(e).__name__}: {e}"
    for name, got, want, limit in checks:
        err = (got - want).abs().max().item()
        if not err <= limit:
            return f"the fused {name} kernel differs from eager PyTorch by {err:.3g} (> {limit}) in {dtype}"
    return None

"""The Triton kernel sources (``@triton.jit``) behind ``kernels.py``'s ops, each built on first use.

Every function here returns a jitted Triton function and caches it, so importing this module
(and the encoder) needs no Triton; ``kernels.py`` checks inputs, picks block sizes and launches
them. Device functions shared by kernels (``store_e4m3_row``, ``gelu_f32``) are passed to them
as constexpr arguments: the interpreter (``TRITON_INTERPRET=1``) does not see a kernel's
closure variables.
"""

from __future__ import annotations

import functools


def next_power_of_2(n: int) -> int:
    """Triton's ``next_power_of_2``: a row's block width."""
    import triton

    return triton.next_power_of_2(n)


@functools.cache
def store_e4m3_row(hardware: bool = False):
    """Device function: quantize one float32 row to float8 e4m3 with a rowwise scale (amax/448)
    and store it and its scale; the same math as ``fp8.quantize_rows``, bit for bit.

    ``hardware``: the GPU's own conversion rounds (to nearest even, saturating), one
    instruction per pair of values; else the rounding is done here in integer arithmetic
    first (the interpreter's float8 cast drops the carry when rounding crosses a power of
    two), a dozen integer operations per value that make a quantizing pass compute-bound."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_e4m3_row_hw(v, mask, Q, S):
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0), 1e-12)
        # IEEE divisions (Triton's `/` is approximate on GPUs): the scale torch computes.
        a = tl.minimum(tl.maximum(v * tl.div_rn(448.0, amax), -448.0), 448.0)
        tl.store(Q, a.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(S, tl.div_rn(amax, 448.0))

    @triton.jit
    def store_e4m3_row(v, mask, Q, S):
        amax = tl.maximum(tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0), 1e-12)
        a = tl.minimum(tl.abs(v * tl.div_rn(448.0, amax)), 448.0)
        # Round to the e4m3 grid, to nearest even, so the final cast is exact. Normal range:
        # keep 3 of float32's 23 mantissa bits. Below 2^-6 (subnormal) the grid is 2^-9:
        # float32 addition of 1.5 * 2^14 rounds there.
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        g = tl.where(a < 0.015625, (a + 24576.0) - 24576.0, normal)
        sign = v.to(tl.int32, bitcast=True) & -2147483648
        g = (g.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        tl.store(Q, g.to(tl.float8e4nv), mask=mask)
        tl.store(S, tl.div_rn(amax, 448.0))

    return store_e4m3_row_hw if hardware else store_e4m3_row


@functools.cache
def add_layer_norm_kernel():
    """``LayerNorm(y + x)`` of one row, written over ``y``; with ``QUANT`` also its FP8 form."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_layer_norm_kernel(
        Y, X, W, B, Q, S, stride, n_cols, eps,
        BLOCK: tl.constexpr, QUANT: tl.constexpr, E4M3: tl.constexpr,
    ):  # fmt: skip
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
        out = (d * rstd * w + b).to(y.dtype)
        tl.store(Y + row * stride + cols, out, mask=mask)
        if QUANT:  # the next GEMM's FP8 input, from the rounded output still in registers
            E4M3(out.to(tl.float32), mask, Q + row * n_cols + cols, S + row)

    return add_layer_norm_kernel


@functools.cache
def gelu_f32():
    """Device function: the exact (erf) GELU of a float32 block."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_f32(h):
        # 1 + erf(h / sqrt 2) through erfc = poly(t) * exp(-z^2) (Abramowitz & Stegun 7.1.26,
        # |error| <= 1.5e-7): a dozen instructions where libdevice's erf takes ~40, and no
        # cancellation on the negative side.
        s = tl.abs(h) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.3275911 * s)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
               + t * (-1.453152027 + t * 1.061405429))))  # fmt: skip
        erfc = poly * tl.exp2(-1.4426950408889634 * s * s)
        one_plus_erf = tl.where(h >= 0, 2.0 - erfc, erfc)
        return 0.5 * h * one_plus_erf

    return gelu_f32


@functools.cache
def gelu_kernel():
    """The exact GELU in place over a flat block of elements."""
    import triton
    import triton.language as tl

    @triton.jit
    def gelu_kernel(X, n, BLOCK: tl.constexpr, GELU_F32: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, GELU_F32(h).to(X.dtype.element_ty), mask=mask)

    return gelu_kernel


@functools.cache
def rows_e4m3_kernel():
    """One row quantized to e4m3 with its scale (optionally of its GELU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_e4m3_kernel(
        X, Q, S, stride, n_cols,
        BLOCK: tl.constexpr, GELU: tl.constexpr, GELU_F32: tl.constexpr, E4M3: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(X + row * stride + cols, mask=mask, other=0.0)
        if GELU:  # rounded to the input dtype first, as gelu_ would write it
            v = GELU_F32(v.to(tl.float32)).to(X.dtype.element_ty)
        E4M3(v.to(tl.float32), mask, Q + row * n_cols + cols, S + row)

    return rows_e4m3_kernel


@functools.cache
def varlen_attention_kernel():
    """Flash attention for one (row block of a sequence, head) of packed, fused QKV."""
    import triton
    import triton.language as tl

    @triton.jit
    def varlen_attention_kernel(
        QKV, OUT, CU, WORK, qk_scale, stride_qkv, stride_o,
        HEADS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # One program per (row block of a sequence, head): the work list holds each
        # sequence's blocks, so no program starts past the end of a short sequence. Work
        # items sit on the grid's x axis (up to 2^31 - 1; y allows 65,535).
        item = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.load(WORK + 2 * item)
        m_block = tl.load(WORK + 2 * item + 1)
        start = tl.load(CU + seq)
        length = tl.load(CU + seq + 1) - start
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

    return varlen_attention_kernel

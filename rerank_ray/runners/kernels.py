"""The Triton kernels as PyTorch ops: checked inputs, launches, availability and a self-check.

The padding-free encoder calls these for the elementwise work fused around its matmuls (their
sources are in ``kernel_sources.py``):

- ``add_layer_norm_``: each encoder layer ends its attention and its feed-forward block with
  ``LayerNorm(y + x)``. Eagerly that is two kernels and five passes over a ``tokens x hidden``
  tensor; this kernel reads ``y`` and ``x`` once and writes the result over ``y``. The sum is
  rounded to the input dtype first (as the fp16/bf16 add does), then normalized in float32.
- ``varlen_attention``: flash attention over packed sequences (cu_seqlens) that reads q, k and
  v straight from the fused QKV projection's output, tiled for short sequences (a reranking
  pair is ~100-500 tokens). Softmax in float32 with the running max, P rounded to the input
  dtype for the PV product: FlashAttention's numerics.
- ``gelu_``: the exact (erf) GELU in place, its erf exact to 1.5e-7 (within one fp16/bf16 ulp
  of PyTorch's result) at a dozen instructions instead of libdevice's ~40, so the pass is
  memory-bound.
- FP8 variants (``fp8.py``): ``add_layer_norm_e4m3_`` also writes its output quantized to
  float8 e4m3 with a per-row scale, and ``rows_e4m3`` quantizes rows (optionally of their GELU,
  which then is never written in 16 bits), so an FP8 GEMM's input costs no pass of its own.
  They round to nearest even (on a GPU with its conversion instruction, under the
  interpreter in integer arithmetic): bit for bit ``fp8.quantize_rows``'s values.

The exact GELU stays a pass of its own after cuBLAS's matmul: matmuls with it in their
epilogue (Triton, cuDNN, CUTLASS) are slower on the GPUs measured (bench/README.md).

Triton is the compiler PyTorch's CUDA builds ship with; where it is missing (CPU-only
installs) ``available()`` is False and the encoder keeps the eager ops. Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (how the tests check them here).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from rerank_ray.runners import kernel_sources as src


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton importable, and CUDA (or CPU
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
    _launch_add_layer_norm(y, x, weight, bias, eps, None)
    return y


def add_layer_norm_e4m3_(
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``add_layer_norm_`` that also emits its output quantized for an FP8 GEMM in the same
    pass: ``(y, q, scale)`` with ``q`` float8 e4m3 [rows, cols] and ``scale`` float32
    [rows, 1] (rowwise amax / 448), equal to ``fp8.quantize_rows(y)``."""
    rows, cols = y.shape if y.dim() == 2 else (0, 0)
    q = torch.empty((rows, cols), device=y.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=y.device, dtype=torch.float32)
    _launch_add_layer_norm(y, x, weight, bias, eps, (q, scale))
    return y, q, scale


def _launch_add_layer_norm(y, x, weight, bias, eps, quant) -> None:
    if y.dim() != 2 or y.shape != x.shape or y.stride() != x.stride() or y.stride(1) != 1:
        raise ValueError(
            f"add_layer_norm_ needs two row-major 2-D tensors of one shape, got "
            f"{tuple(y.shape)}/{y.stride()} and {tuple(x.shape)}/{x.stride()}."
        )
    rows, cols = y.shape
    if rows == 0:
        return
    block = src.next_power_of_2(cols)
    warps = 4 if block <= 1024 else 8
    q, scale = quant if quant is not None else (y, y)  # unused pointers without QUANT
    src.add_layer_norm_kernel()[(rows,)](
        y, x, weight, bias, q, scale, y.stride(0), cols, eps,
        BLOCK=block, QUANT=quant is not None, E4M3=_store_e4m3(), num_warps=warps,
    )  # fmt: skip


def rows_e4m3(x: torch.Tensor, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, cols] (row-major) quantized for an FP8 GEMM in one pass: ``(q, scale)``
    as ``fp8.quantize_rows``; with ``gelu``, of ``gelu_(x)`` (x itself is not written)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"rows_e4m3 needs a row-major 2-D tensor, got {x.stride()}.")
    rows, cols = x.shape
    q = torch.empty((rows, cols), device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    if rows:
        block = src.next_power_of_2(cols)
        src.rows_e4m3_kernel()[(rows,)](
            x, q, scale, x.stride(0), cols,
            BLOCK=block, GELU=gelu, GELU_F32=src.gelu_f32(), E4M3=_store_e4m3(),
            num_warps=2 if block <= 1024 else 4,  # the fastest measured (bench/README.md)
        )  # fmt: skip
    return q, scale


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU in place, in float32 math rounded once to ``x``'s dtype, as
    PyTorch's; erf to 1.5e-7 (far below a 16-bit float's resolution), so a result differs from
    ``F.gelu`` by at most one unit in the last place of fp16/bf16, and rarely. The cheap erf
    keeps the elementwise pass memory-bound. Returns ``x``."""
    if not x.is_contiguous():
        raise ValueError(f"gelu_ needs a contiguous tensor, got strides {x.stride()}.")
    n = x.numel()
    if n:
        block = 1024 if _interpreting() else 4096
        grid = (-(-n // block),)
        src.gelu_kernel()[grid](x, n, BLOCK=block, GELU_F32=src.gelu_f32(), num_warps=8)
    return x


def _store_e4m3():
    """The e4m3 rounding the FP8 kernels use: the GPU's conversion instruction, or integer
    arithmetic under the interpreter (whose float8 cast is off by one step at some ties);
    both give ``fp8.quantize_rows``'s values."""
    return src.store_e4m3_row(hardware=not _interpreting())


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _half_on_gpu(name: str, x: torch.Tensor) -> None:
    """The attention kernel's dots take fp16/bf16 on a GPU: there Triton would run float32
    dots in TF32, less exact than the eager float32 path it stands in for."""
    if x.device.type == "cuda" and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} takes float16 or bfloat16 on a GPU, got {x.dtype}.")


def attention_supported(head_dim: int) -> bool:
    """Head sizes the attention kernel takes (a power of two the matmul units tile)."""
    return head_dim in (16, 32, 64, 128)


def attention_block_rows() -> int:
    """Query rows per program of the attention kernel: 64 on a GPU; 16 under the
    interpreter, so tests cross tile edges with short sequences."""
    return 16 if _interpreting() else 64


def attention_work(lengths: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """The attention kernel's work list for sequences of ``lengths``: (sequence, row block)
    pairs, int32, flattened. Built on the host with the rest of a micro-batch's inputs.
    ``block_rows``: the tile's rows (default ``attention_block_rows()``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    blocks = -(-lengths // (block_rows or attention_block_rows()))
    seq = np.repeat(np.arange(len(lengths), dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    return np.stack([seq, np.arange(len(seq)) - first], axis=1).astype(np.int32).reshape(-1)


def varlen_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    heads: int,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence, no mask beyond the sequence bounds.

    ``qkv`` is the fused projection's output, [tokens, 3 * heads * head_dim] row-major (q, k, v
    blocks of ``heads * head_dim`` each); ``cu_seqlens`` int32 [B + 1], starting at 0;
    ``work``: ``attention_work`` of the lengths as an int32
    tensor on the device (built here from ``cu_seqlens`` when None, at the cost of a copy to
    the host). Returns [tokens, heads * head_dim]."""
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] % (3 * heads):
        raise ValueError(
            f"varlen_attention needs qkv [tokens, 3 * heads * head_dim] row-major with "
            f"heads={heads}, got {tuple(qkv.shape)}/{qkv.stride()}."
        )
    _half_on_gpu("varlen_attention", qkv)
    tokens, width = qkv.shape[0], qkv.shape[1] // 3
    head_dim = width // heads
    if not attention_supported(head_dim):
        raise ValueError(f"varlen_attention takes head_dim 16, 32, 64 or 128, got {head_dim}.")
    out = torch.empty((tokens, width), device=qkv.device, dtype=qkv.dtype)
    n_seq = cu_seqlens.shape[0] - 1
    if tokens == 0 or n_seq == 0:
        return out
    block_m = attention_block_rows()
    block_n, stages, warps = (16, 1, 1) if _interpreting() else (64, 3, 4)
    if work is None:
        lengths = np.diff(cu_seqlens.cpu().numpy())
        work = torch.from_numpy(attention_work(lengths, block_m)).to(qkv.device)
    scale = 1.4426950408889634 / math.sqrt(head_dim)  # log2(e) / sqrt(d)
    # One fixed tile (the fastest measured on the scorer's micro-batches, bench/README.md):
    # one compile at actor start, not one per candidate.
    src.varlen_attention_kernel()[(work.shape[0] // 2, heads)](
        qkv, out, cu_seqlens, work, scale, qkv.stride(0), out.stride(0),
        HEADS=heads, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out


def self_check(
    device: torch.device, dtype: torch.dtype, head_dim: int | None = None, width: int = 96
) -> str | None:
    """Run each kernel once on a small input and compare with eager PyTorch: add+LayerNorm
    (rows of ``width``: the model's hidden size, so the variant compiled here is the one its
    forward runs, not one more compile on a fresh node), GELU and (given a supported
    ``head_dim``) the attention. None when they all agree, else why not (a Triton that cannot
    compile for this GPU, a wrong result). The scorer calls it at actor start and keeps the
    eager ops when it fails."""
    import torch.nn.functional as F

    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    checks = []
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

        y, x, w, b = randn(64, width), randn(64, width), randn(width), randn(width)
        want = F.layer_norm((y + x).float(), (width,), w.float(), b.float(), 1e-5)
        got = add_layer_norm_(y.clone(), x, w, b, 1e-5).float()
        checks.append(("add+LayerNorm", got, want, tol))
        h = randn(64, 96, scale=3.0)
        checks.append(("GELU", gelu_(h.clone()).float(), F.gelu(h.float()), tol))

        if head_dim is not None and attention_supported(head_dim):
            heads, lengths = 2, (3, 70, 130)
            cu = torch.tensor((0, 3, 73, 203), dtype=torch.int32, device=device)
            qkv = randn(203, 3 * heads * head_dim)
            got = varlen_attention(qkv, cu, heads).float()
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

"""Attention within each packed sequence: which backend runs it here, and running it.

Backends: ``varlen`` (``torch.nn.attention.varlen.varlen_attn``, CUDA flash attention over
cu_seqlens), ``triton`` (``kernels.varlen_attention``: flash attention reading the fused QKV
output in place, tiled for short sequences) and ``sdpa`` (q/k/v scattered into a padded block
per micro-batch and gathered back: exact, any device; the CPU reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rerank_ray.runners import kernels

ATTENTION_BACKENDS = ("auto", "varlen", "triton", "sdpa")


def varlen_attention_available() -> bool:
    """Whether this PyTorch has ``torch.nn.attention.varlen.varlen_attn`` and a CUDA device."""
    return _varlen_attn() is not None and torch.cuda.is_available()


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def pick_backend(attention: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend ``attention`` (one of ``ATTENTION_BACKENDS``) means on ``device``: ``auto``
    is varlen where available with fp16/bf16, else sdpa. A ``ValueError`` (naming the fix)
    where the one asked for cannot run here."""
    on_cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if attention == "auto":
        attention = "varlen" if (on_cuda and half and _varlen_attn() is not None) else "sdpa"
    if attention == "varlen" and (not on_cuda or _varlen_attn() is None):
        raise ValueError(
            "attention='varlen' needs CUDA and torch.nn.attention.varlen.varlen_attn "
            f"(device {device}, torch {torch.__version__}); use attention='sdpa'."
        )
    if attention == "triton" and not (
        kernels.available(device) and kernels.attention_supported(head_dim)
    ):
        raise ValueError(
            f"attention='triton' needs Triton, CUDA and a head size of 16, 32, 64 or 128 "
            f"(device {device}, head size {head_dim}); use 'varlen' or 'sdpa'."
        )
    return attention


def attend(
    backend: str, qkv: torch.Tensor, cu: torch.Tensor, max_len: int, extra: torch.Tensor,
    heads: int, first_only: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention output of every token ([T, hidden]), or with ``first_only`` of each
    sequence's first token only ([B, hidden]; queries from those tokens, keys and values
    from all). ``qkv``: the fused projection's output [T, 3 * hidden]; ``extra``: the staged
    buffer's extra part for ``backend`` (``staging.py``)."""
    n_tok = qkv.shape[0]
    n_seq = cu.shape[0] - 1
    hidden = qkv.shape[1] // 3
    firsts = cu[:-1]
    if backend == "triton":  # extra: the work list for these queries
        out = kernels.varlen_attention(qkv, cu, heads, work=extra)
        # with first_only, only the first row blocks were written
        return out.index_select(0, firsts) if first_only else out
    qkv = qkv.view(n_tok, 3, heads, hidden // heads)
    if backend == "varlen":
        q, k, v = qkv.unbind(1)
        if not first_only:
            out = _varlen_attn()(q, k, v, cu, cu, max_len, max_len)
            return out.reshape(n_tok, hidden)
        cu_q = torch.arange(n_seq + 1, device=cu.device, dtype=cu.dtype)
        out = _varlen_attn()(q.index_select(0, firsts), k, v, cu_q, cu, 1, max_len)
        return out.reshape(n_seq, hidden)
    row, col = extra.view(2, n_tok).long()
    padded = qkv.new_zeros(n_seq, max_len, 3, heads, qkv.shape[-1])
    padded[row, col] = qkv
    q, k, v = (padded[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, L, d)
    lengths = (cu[1:] - cu[:-1]).long()
    keep = torch.arange(max_len, device=qkv.device)[None, :] < lengths[:, None]
    if first_only:
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=keep[:, None, None])
        return out.reshape(n_seq, hidden)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)[row, col].reshape(n_tok, hidden)

"""Run under ``TRITON_INTERPRET=1`` by test_kernels.py: the Triton kernels (fused add+LayerNorm,
varlen attention) on CPU tensors (Triton's interpreter), against eager PyTorch. Prints one JSON
line of results."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(__file__))

from test_encoder import LENGTHS, _batch, _bert, _hf_padded, _xlmr  # noqa: E402

from rerank_ray.runners import kernels  # noqa: E402
from rerank_ray.runners.encoder import PackedEncoder  # noqa: E402

out = {"available_cpu": kernels.available(torch.device("cpu"))}
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for cols in (1024, 96):  # a power of two, and one that needs the column mask
        y, x = torch.randn(37, cols, dtype=dtype) * 3, torch.randn(37, cols, dtype=dtype)
        w, b = torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype)
        y_in = y.clone()
        got = kernels.add_layer_norm_(y, x, w, b, 1e-5)
        eager = F.layer_norm(y_in + x, (cols,), w, b, 1e-5)
        exact = F.layer_norm((y_in + x).double(), (cols,), w.double(), b.double(), 1e-5)
        out[f"{dtype}-{cols}"] = {
            "in_place": got.data_ptr() == y.data_ptr(),
            "kernel_vs_exact": (got.double() - exact).abs().max().item(),
            "eager_vs_exact": (eager.double() - exact).abs().max().item(),
            "kernel_vs_eager": (got.double() - eager.double()).abs().max().item(),
        }
# GELU: a spread of values (deep negative tail, around 0, large positive), odd length.
for dtype in (torch.float32, torch.float16):
    h = torch.cat([torch.linspace(-12, 12, 4001), torch.randn(3001) * 3]).to(dtype)
    exact = F.gelu(h.double())
    eager = F.gelu(h.float()).to(dtype)  # fp32 math, one rounding (PyTorch's fp16 GELU)
    got = kernels.gelu_(h.clone())
    diff = (got.double() - eager.double()).abs()
    # one unit in the last place of eager's value, in the dtype (subnormals included)
    ulp = torch.nextafter(eager.abs(), torch.tensor(float("inf"), dtype=dtype)) - eager.abs()
    body = exact.abs() >= 1e-3  # the tail below: eager's 1 + erf cancels, the kernel's not
    out[f"gelu-{dtype}"] = {
        "kernel_vs_exact": (got.double() - exact).abs().max().item(),
        "eager_vs_exact": (eager.double() - exact).abs().max().item(),
        "kernel_vs_eager_in_ulps": (diff[body] / ulp.double()[body]).max().item(),
        "kernel_vs_eager_tail": diff[~body].max().item(),
    }
try:
    kernels.gelu_(torch.zeros(4, 8).t())
    out["gelu_layout_error"] = None
except ValueError as e:
    out["gelu_layout_error"] = str(e)
out["self_check"] = kernels.self_check(torch.device("cpu"), torch.float32)
try:
    kernels.add_layer_norm_(
        torch.zeros(4, 8), torch.zeros(4, 9), torch.ones(8), torch.ones(8), 1e-5
    )
    out["shape_error"] = None
except ValueError as e:
    out["shape_error"] = str(e)

seqs, _, offsets = _batch(LENGTHS)
xlmr = _xlmr()
fused = PackedEncoder(xlmr, fused_layer_norm=True)
got = fused.score(np.concatenate(seqs), offsets, None)
out["xlmr_vs_hf"] = float(np.abs(got - _hf_padded(xlmr, seqs, None, pad_id=1)).max())
seqs, types, offsets = _batch(LENGTHS, seed=2, with_types=True)
bert = _bert()
got = PackedEncoder(bert, fused_layer_norm=True).score(
    np.concatenate(seqs), offsets, np.concatenate(types)
)
out["bert_vs_hf"] = float(np.abs(got - _hf_padded(bert, seqs, types, pad_id=0)).max())


def attention_reference(qkv, cu, heads):
    """Per-sequence softmax attention in float64 (SDPA), packed back like the kernel's output."""
    parts = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        q, k, v = qkv[s:e].double().view(e - s, 3, heads, -1).unbind(1)
        o = F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v)))
        parts.append(o.transpose(0, 1).reshape(e - s, -1))
    return torch.cat(parts)


# Lengths around the interpreter's 16-row tiles: one token, a tile less/exactly/more, several.
lengths = [1, 15, 16, 17, 40, 3]
cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32)
for dtype in (torch.float32, torch.float16):
    qkv = torch.randn(sum(lengths), 3 * 2 * 16, dtype=dtype) * 2
    got = kernels.varlen_attention(qkv, cu, 2)
    exact = attention_reference(qkv, cu, 2)
    eager = attention_reference(qkv.float(), cu, 2).to(dtype)  # fp32 math, one rounding
    out[f"attention-{dtype}"] = {
        "shape": list(got.shape),
        "kernel_vs_exact": (got.double() - exact).abs().max().item(),
        "rounded_exact_vs_exact": (eager.double() - exact).abs().max().item(),
    }
for bad in ((torch.zeros(10, 95), 2), (torch.zeros(10, 3 * 2 * 12), 2)):
    try:
        kernels.varlen_attention(bad[0], torch.tensor([0, 10], dtype=torch.int32), bad[1])
        out.setdefault("attention_errors", []).append(None)
    except ValueError as e:
        out.setdefault("attention_errors", []).append(str(e))
out["self_check_attention"] = kernels.self_check(torch.device("cpu"), torch.float32, 16)

# The encoder with the Triton attention (head size 16: hidden 64, 4 heads), fp32, against HF.
xlmr16 = _xlmr(hidden=64)
seqs, _, offsets = _batch(LENGTHS)
ref = _hf_padded(xlmr16, seqs, None, pad_id=1)
ids = np.concatenate(seqs)
eager = PackedEncoder(xlmr16, attention="sdpa").score(ids, offsets, None)
triton_attn = PackedEncoder(xlmr16, attention="triton", fused_layer_norm=True)
out["triton_attention_xlmr_vs_hf"] = float(
    np.abs(triton_attn.score(ids, offsets, None) - ref).max()
)
out["sdpa_xlmr_vs_hf"] = float(np.abs(eager - ref).max())
# The last layer on the first tokens only (the default) against the whole last layer.
full = PackedEncoder(xlmr16, attention="triton", first_token_last_layer=False)
out["triton_attention_full_last_layer_vs_hf"] = float(
    np.abs(full.score(ids, offsets, None) - ref).max()
)
out["triton_attention_first_token_last_layer"] = triton_attn.first_token_last_layer
gelu_enc = PackedEncoder(xlmr16, attention="triton", fused_layer_norm=True, triton_gelu=True)
out["triton_gelu_xlmr_vs_hf"] = float(np.abs(gelu_enc.score(ids, offsets, None) - ref).max())

# FP8: the fused quantization (add+LayerNorm, GELU, plain rows) against fp8.quantize_rows, bit
# for bit, and the FP8 encoder with every fused kernel against the same encoder without them.
from rerank_ray.runners import fp8  # noqa: E402

mismatches = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for cols in (96, 384):
        y, x = torch.randn(29, cols, dtype=dtype) * 3, torch.randn(29, cols, dtype=dtype)
        w, b = torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype)
        y_plain = kernels.add_layer_norm_(y.clone(), x, w, b, 1e-5)
        y, q, scale = kernels.add_layer_norm_e4m3_(y, x, w, b, 1e-5)
        ref = fp8.quantize_rows(y)
        h = torch.randn(29, cols, dtype=dtype) * 3
        gq, gs = kernels.rows_e4m3(h, gelu=True)
        gref = fp8.quantize_rows(kernels.gelu_(h.clone()))
        pq, ps = kernels.rows_e4m3(h)
        pref = fp8.quantize_rows(h)
        mismatches[f"{dtype}-{cols}"] = {
            "ln_output_vs_add_layer_norm_": (y.float() - y_plain.float()).abs().max().item(),
            "ln_q": int((q.view(torch.uint8) != ref.q.view(torch.uint8)).sum()),
            "ln_scale": (scale - ref.scale).abs().max().item(),
            "gelu_q": int((gq.view(torch.uint8) != gref.q.view(torch.uint8)).sum()),
            "gelu_scale": (gs - gref.scale).abs().max().item(),
            "rows_q": int((pq.view(torch.uint8) != pref.q.view(torch.uint8)).sum()),
            "rows_scale": (ps - pref.scale).abs().max().item(),
        }
out["fp8_kernels"] = mismatches
out["fp8_self_check"] = list(fp8.self_check(torch.device("cpu"), torch.float32, fused=True))
# at a model's own widths (the variants its forward compiles), here a small model's
out["fp8_self_check_widths"] = list(
    fp8.self_check(torch.device("cpu"), torch.float32, True, 128, 512)
)
out["self_check_width"] = kernels.self_check(torch.device("cpu"), torch.float32, None, 128)
plain = fp8.Fp8Encoder(xlmr16, path="emulate").score(ids, offsets, None)
fused_fp8 = fp8.Fp8Encoder(
    xlmr16, path="emulate", attention="triton", fused_layer_norm=True, triton_gelu=True,
    fused_quantization=True,
)  # fmt: skip
out["fp8_fused_vs_unfused"] = float(np.abs(fused_fp8.score(ids, offsets, None) - plain).max())
out["fp8_logit_std"] = float(plain.std())
print(json.dumps(out))

"""Run under ``TRITON_INTERPRET=1`` by test_kernels.py: the fused add+LayerNorm kernel on CPU
tensors (Triton's interpreter), against eager PyTorch. Prints one JSON line of results."""

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

from rerank_ray import kernels  # noqa: E402
from rerank_ray.encoder import PackedEncoder  # noqa: E402

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
print(json.dumps(out))

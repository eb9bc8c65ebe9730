"""The Triton kernels (fused add+LayerNorm, varlen attention): checked on CPU through Triton's
interpreter (the same kernel source the GPU compiles), and the encoder's guards where they
cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_encoder import _xlmr

from rerank_ray.runners import kernels
from rerank_ray.runners.encoder import PackedEncoder


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Results of _interpret_kernels.py, run with TRITON_INTERPRET=1 (it must be set before
    Triton is imported, so in a process of its own)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("_interpret_kernels.py")
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_equals_eager_add_then_layer_norm(interpreted):
    assert interpreted["available_cpu"] is True
    for key in ("torch.float32-1024", "torch.float32-96"):
        r = interpreted[key]
        assert r["in_place"], key
        assert r["kernel_vs_eager"] < 1e-5, (key, r)
    for key in ("torch.float16-1024", "torch.float16-96"):
        r = interpreted[key]
        assert r["in_place"], key
        # Same rounding points as the eager fp16 pair: no further from the exact result.
        assert r["kernel_vs_exact"] <= r["eager_vs_exact"] + 1e-6, (key, r)


def test_kernels_reject_bad_layouts_and_pass_their_self_check(interpreted):
    assert interpreted["shape_error"] and "row-major 2-D tensors" in interpreted["shape_error"]
    assert interpreted["self_check"] is None


def test_encoder_with_fused_layer_norm_matches_hf(interpreted):
    assert interpreted["xlmr_vs_hf"] < 1e-4
    assert interpreted["bert_vs_hf"] < 1e-4


def test_fused_layer_norm_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.available(torch.device("cpu")) is False
    with pytest.raises(ValueError, match="fused_layer_norm needs Triton and CUDA"):
        PackedEncoder(_xlmr(), fused_layer_norm=True)


def test_attention_kernel_equals_softmax_attention_per_sequence(interpreted):
    for dtype, tol in (("torch.float32", 1e-5), ("torch.float16", None)):
        r = interpreted[f"attention-{dtype}"]
        assert r["shape"] == [92, 32], r
        if tol is not None:
            assert r["kernel_vs_exact"] < tol, r
        else:  # fp16: P and the output are rounded, as in FlashAttention; a few ulps at most
            assert r["kernel_vs_exact"] <= 4 * r["rounded_exact_vs_exact"] + 1e-3, r


def test_attention_kernel_rejects_bad_layouts_and_passes_its_self_check(interpreted):
    not_qkv, bad_head = interpreted["attention_errors"]
    assert not_qkv and "3 * heads * head_dim" in not_qkv
    assert bad_head and "head_dim 16, 32, 64 or 128, got 12" in bad_head
    assert interpreted["self_check_attention"] is None


def test_encoder_with_triton_attention_matches_hf(interpreted):
    # fp32: the padded SDPA path is ~1e-8 from HF here; the kernel must be as close.
    assert interpreted["sdpa_xlmr_vs_hf"] < 1e-6
    assert interpreted["triton_attention_xlmr_vs_hf"] < 1e-6
    # with the last layer on the first tokens (the default, its own work list) and without
    assert interpreted["triton_attention_first_token_last_layer"] is True
    assert interpreted["triton_attention_full_last_layer_vs_hf"] < 1e-6


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float16"])
def test_gelu_kernel_is_the_exact_gelu_to_the_dtypes_resolution(interpreted, dtype):
    r = interpreted[f"gelu-{dtype}"]
    # as close to the float64 GELU as PyTorch's own (fp32: its erf's error; fp16: rounding)
    assert r["kernel_vs_exact"] <= 2 * r["eager_vs_exact"] + 1e-6
    if dtype == "torch.float16":  # at most one unit in the last place from PyTorch's result
        assert r["kernel_vs_eager_in_ulps"] <= 1.0
    # (fp32's ulp is finer than either erf's error: there the bound above is the check)
    assert r["kernel_vs_eager_tail"] <= 1e-6  # where eager's 1 + erf cancels
    assert "contiguous" in interpreted["gelu_layout_error"]


def test_encoder_with_triton_gelu_matches_hf(interpreted):
    assert interpreted["triton_gelu_xlmr_vs_hf"] < 1e-6


def test_triton_gelu_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton_gelu runs the exact GELU"):
        PackedEncoder(_xlmr(), triton_gelu=True)


def test_triton_attention_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention='triton' needs Triton, CUDA"):
        PackedEncoder(_xlmr(), attention="triton")


def test_attention_work_list_covers_every_row_of_every_sequence_once():
    """One (sequence, row block) item per block of attention_block_rows() query rows: every
    row of every sequence falls in exactly one item, and no item starts past its sequence."""
    import numpy as np

    rows = kernels.attention_block_rows()
    lengths = np.array([1, rows - 1, rows, rows + 1, 5 * rows + 3, 2])
    work = kernels.attention_work(lengths).reshape(-1, 2)
    assert work.dtype == np.int32
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for seq, block in work:
        assert 0 <= block * rows < lengths[seq]
        covered[seq][block * rows : (block + 1) * rows] += 1
    assert all((c == 1).all() for c in covered)
    assert kernels.attention_work(np.array([], dtype=np.int64)).shape == (0,)


def test_attention_work_list_for_another_tile_and_the_first_blocks():
    """The probes' tile rows (``block_rows``): the same cover for 128-row blocks; and lengths
    clipped to 1 give each sequence's first block once (the encoder's last-layer list)."""
    import numpy as np

    lengths = np.array([1, 127, 128, 129, 300])
    work = kernels.attention_work(lengths, 128).reshape(-1, 2)
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for seq, block in work:
        assert 0 <= block * 128 < lengths[seq]
        covered[seq][block * 128 : (block + 1) * 128] += 1
    assert all((c == 1).all() for c in covered)
    firsts = kernels.attention_work(np.minimum(lengths, 1)).reshape(-1, 2)
    assert firsts.tolist() == [[i, 0] for i in range(len(lengths))]


def test_fp8_quantization_kernels_equal_pytorch_quantization_bit_for_bit(interpreted):
    for key, r in interpreted["fp8_kernels"].items():
        assert r["ln_output_vs_add_layer_norm_"] == 0.0, (key, r)
        assert r["ln_q"] == r["gelu_q"] == r["rows_q"] == 0, (key, r)
        assert r["ln_scale"] == r["gelu_scale"] == r["rows_scale"] == 0.0, (key, r)
    assert interpreted["fp8_self_check"] == [None, True]
    assert interpreted["fp8_self_check_widths"] == [None, True]
    assert interpreted["self_check_width"] is None


def test_fp8_encoder_with_fused_kernels_matches_it_without(interpreted):
    # the fused LayerNorm/attention round differently in float32 (1e-6), which can move an
    # activation by one e4m3 step now and then: far below the FP8 error itself
    assert interpreted["fp8_fused_vs_unfused"] <= 0.02 * interpreted["fp8_logit_std"] + 1e-6

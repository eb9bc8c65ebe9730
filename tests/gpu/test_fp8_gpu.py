"""GPU checks of the FP8 runner (skipped without CUDA or below compute capability 8.9): its
CUDA GEMMs against the emulated math, its fused quantization kernels against PyTorch's, and
its ranking against fp16 within the accuracy gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_ray.runners import RunnerOptions, build_runner, fp8
from rerank_ray.runners.fp8 import Fp8Encoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY,
        reason="needs a CUDA GPU of compute capability 8.9 or newer",
    ),
]


def _model_dir(tmp_path):
    """A small XLM-R with weights drawn wide enough that its logits differ across pairs (HF's
    default init gives nearly constant logits, where any rounding reorders them)."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = XLMRobertaConfig(
        vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=514, type_vocab_size=1,
        pad_token_id=1, layer_norm_eps=1e-5, num_labels=1, initializer_range=0.1,
    )  # fmt: skip
    model = XLMRobertaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def _pairs(n: int, per_query: int = 50, seed: int = 0):
    """Packed pairs: each group of ``per_query`` shares a query prefix, documents differ."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n // per_query):
        query = rng.integers(3, 1000, int(rng.integers(6, 20)))
        for _ in range(per_query):
            doc = rng.integers(3, 1000, int(rng.integers(20, 300)))
            seqs.append(np.concatenate(([0], query, [2, 2], doc, [2])).astype(np.int32))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    return np.concatenate(seqs), offsets, np.arange(len(seqs)) // per_query


def _per_query(ref: np.ndarray, got: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Mean per-query Spearman and mean top-10 overlap of ``got`` against ``ref``."""

    def ranks(x):
        r = np.empty(len(x))
        r[np.argsort(x)] = np.arange(len(x))
        return r

    rho, top = [], []
    for g in np.unique(group):
        a, b = ref[group == g], got[group == g]
        rho.append(np.corrcoef(ranks(a), ranks(b))[0, 1])
        top.append(len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10)
    return float(np.mean(rho)), float(np.mean(top))


def test_self_check_passes_and_the_factory_builds_the_fp8_runner(tmp_path):
    device = torch.device("cuda")
    assert fp8.self_check(device, torch.bfloat16, fused=True) == (None, True)
    built = build_runner(_model_dir(tmp_path), RunnerOptions(precision="fp8"))
    assert isinstance(built.runner, Fp8Encoder)
    assert built.runner.path == "cuda" and built.runner.fused_quantization
    assert built.dtype == torch.bfloat16 and built.load_path == "checkpoint"


def test_cuda_fp8_is_as_accurate_as_the_emulated_math(tmp_path):
    """The accuracy gate is measured on the emulated path (bench/fp8_accuracy.py); the CUDA
    path quantizes the same way, but its GEMMs accumulate in another order, and in a quantized
    network one rounding difference can move a later activation by a whole e4m3 step (1/8
    relative), so the two paths differ pair by pair about as much as either differs from
    FP32. What must hold: the GPU's FP8 is no less accurate than the emulated math, against
    the FP32 forward, in |Δ| and in per-query ranking."""
    from transformers import AutoModelForSequenceClassification

    from rerank_ray.runners.padded import PaddedRunner

    device = torch.device("cuda")
    model = AutoModelForSequenceClassification.from_pretrained(_model_dir(tmp_path)).cuda()
    ids, offsets, group = _pairs(1000)
    fp32 = PaddedRunner(model, device).score(ids, offsets, None).astype(np.float64)
    opts = fp8.fp8_options(model.config, device, torch.bfloat16, RunnerOptions())
    cuda = Fp8Encoder(model, dtype=torch.bfloat16, **opts).score(ids, offsets)
    emulated = Fp8Encoder(model, dtype=torch.bfloat16, **{**opts, "path": "emulate"})
    want = emulated.score(ids, offsets)
    err_cuda, err_emulated = np.abs(cuda - fp32).mean(), np.abs(want - fp32).mean()
    assert err_cuda <= 1.25 * err_emulated, (err_cuda, err_emulated, fp32.std())
    got, expected = _per_query(fp32, cuda, group), _per_query(fp32, want, group)
    assert got[0] >= expected[0] - 0.01 and got[1] >= expected[1] - 0.03, (got, expected)


def test_fp8_against_fp16_on_the_gpu_is_what_the_emulation_measures(tmp_path):
    """The accuracy gate is measured with the emulated path (bench/fp8_accuracy.py, on CPU);
    here the GPU runner, built by the factory, must rank as that emulation does against the
    same fp16 scores (the ranking figures themselves depend on the model: bench/README.md)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = _model_dir(tmp_path)
    ids, offsets, group = _pairs(1000)
    fp16 = build_runner(model_dir, RunnerOptions()).runner.score(ids, offsets).astype(np.float64)
    gpu = build_runner(model_dir, RunnerOptions(precision="fp8")).runner
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    emulated = Fp8Encoder(
        model, dtype=torch.bfloat16, path="emulate", layers_16bit=gpu.layers_16bit
    )
    got = _per_query(fp16, gpu.score(ids, offsets).astype(np.float64), group)
    want = _per_query(fp16, emulated.score(ids, offsets).astype(np.float64), group)
    assert abs(got[0] - want[0]) <= 0.01 and abs(got[1] - want[1]) <= 0.03, (got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_quantization_kernels_give_quantize_rows_values_bit_for_bit(dtype):
    """The kernels round with the GPU's own e4m3 conversion: the values and scales must be
    exactly ``fp8.quantize_rows``'s (PyTorch's cast), ties and subnormals included."""
    from rerank_ray.runners import kernels

    gen = torch.Generator(device="cpu").manual_seed(1)
    rows, cols = 3000, 1024
    # Wide magnitudes per row, so many values land in e4m3's subnormal range after scaling;
    # below fp16's largest value (an inf would make a NaN row, whose amax the two disagree on).
    spread = torch.exp(torch.randn(rows, cols, generator=gen) * 2).clamp(max=1000)
    x = torch.randn(rows, cols, generator=gen) * spread
    x = x.to("cuda", dtype)
    r = (torch.randn(rows, cols, generator=gen) * 0.1).to("cuda", dtype)
    w = torch.randn(cols, generator=gen).to("cuda", dtype)
    b = torch.randn(cols, generator=gen).to("cuda", dtype)
    y, q, scale = kernels.add_layer_norm_e4m3_(x.clone(), r, w, b, 1e-5)
    want = fp8.quantize_rows(y)
    assert torch.equal(scale, want.scale)
    assert torch.equal(q.view(torch.uint8), want.q.view(torch.uint8))
    for gelu in (False, True):
        q, scale = kernels.rows_e4m3(x, gelu=gelu)
        want = fp8.quantize_rows(kernels.gelu_(x.clone()) if gelu else x)
        assert torch.equal(scale, want.scale), gelu
        assert torch.equal(q.view(torch.uint8), want.q.view(torch.uint8)), gelu

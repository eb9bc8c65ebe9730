"""The FP8 runner's math (emulated on CPU) against a plain quantize-dequantize reference, and
the precision option: validated, refused where FP8 cannot run, chosen only when asked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_encoder import LENGTHS, _batch, _bert, _hf_padded, _xlmr

from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.runners import DeviceError, RunnerOptions, build_runner, fp8
from rerank_ray.runners.encoder import PackedEncoder
from rerank_ray.runners.fp8 import Fp8Encoder, fp8_gemm, quantize_rows, quantize_weight
from rerank_ray.runners.padded import PaddedRunner


def reference_qdq(t: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3 quantize then dequantize, written the plain way (scale = amax / 448)."""
    flat = t.reshape(-1, t.shape[-1]).float()
    scale = flat.abs().amax(dim=1, keepdim=True) / 448.0
    return ((flat / scale).to(torch.float8_e4m3fn).float() * scale).reshape(t.shape)


def test_emulated_gemm_equals_quantize_dequantize_linear():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=gen)
    x[:, 5] *= 40  # an outlier feature, as trained encoders have
    w, b = torch.randn(48, 64, generator=gen) / 8, torch.randn(48, generator=gen)
    got = fp8_gemm(quantize_rows(x), quantize_weight(w), b, torch.float32, "emulate")
    want = F.linear(reference_qdq(x), reference_qdq(w), b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it is quantized: off the float32 Linear by a few percent of its output
    exact = F.linear(x, w, b)
    rel = ((got - exact).abs().max() / exact.abs().max()).item()
    assert 1e-3 < rel < 0.1, rel


def test_quantize_rows_lands_each_row_amax_on_448_and_keeps_zero_rows_finite():
    x = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [1e-3, 3e-3, -7e-3]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 1)
    assert q.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]
    assert torch.isfinite(q.float() * scale).all()
    torch.testing.assert_close(q.float() * scale, x, rtol=0.07, atol=0.0)


def _with_reference_fp8_linears(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """A copy of ``model`` whose encoder layers ``layers`` compute each projection on
    ``reference_qdq`` inputs and weights (HF's own forward otherwise)."""
    import copy

    model = copy.deepcopy(model)
    encoder = model.base_model.encoder
    for i in layers:
        for linear in encoder.layer[i].modules():
            if isinstance(linear, torch.nn.Linear):
                w = reference_qdq(linear.weight.detach())
                linear.forward = lambda x, w=w, b=linear.bias: F.linear(reference_qdq(x), w, b)
    return model


@pytest.mark.parametrize("make, pad_id", [(_xlmr, 1), (_bert, 0)])
def test_fp8_encoder_equals_hf_forward_with_quantized_linears(make, pad_id):
    model = make()
    with_types = pad_id == 0
    seqs, types, offsets = _batch(LENGTHS, seed=3, with_types=with_types)
    ids = np.concatenate(seqs)
    flat_types = np.concatenate(types) if with_types else None
    for keep in ((), (0,), (-1,)):
        runner = Fp8Encoder(model, path="emulate", layers_16bit=keep)
        fp8_layers = [i for i in range(2) if i not in runner.layers_16bit]
        want = _hf_padded(
            _with_reference_fp8_linears(model, fp8_layers), seqs, types if with_types else None,
            pad_id=pad_id,
        )  # fmt: skip
        got = runner.score(ids, offsets, flat_types)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)
    # all layers 16-bit: the packed encoder itself
    plain = PackedEncoder(model).score(ids, offsets, flat_types)
    np.testing.assert_array_equal(
        Fp8Encoder(model, path="emulate", layers_16bit=(0, 1)).score(ids, offsets, flat_types),
        plain,
    )


def test_fp8_encoder_quantizes_every_projection_of_its_fp8_layers_only():
    runner = Fp8Encoder(_xlmr(), path="emulate", layers_16bit=(-1,))
    assert runner.layers_16bit == (1,)
    first, last = runner._layers
    for name in ("qkv_w", "out_w", "up_w", "down_w"):
        assert isinstance(getattr(first, name), fp8.Fp8Weight)
        assert getattr(first, name).q.dtype == torch.float8_e4m3fn
        assert getattr(last, name).dtype == torch.float32
    with pytest.raises(ValueError, match="layers_16bit"):
        Fp8Encoder(_xlmr(), path="emulate", layers_16bit=(2,))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Fp8Encoder(_xlmr(), path="cuda")


def test_precision_option_is_validated():
    assert RunnerOptions().precision == "auto"
    assert JobConfig(input="in/", output="out/").to_dict()["precision"] == "auto"
    with pytest.raises(ConfigError, match=r"`precision` is 'int4'; choose one of auto, int8, fp8"):
        RunnerOptions(precision="int4")
    with pytest.raises(ConfigError, match="--dtype bfloat16"):
        RunnerOptions(precision="fp8", dtype="float32")
    with pytest.raises(ConfigError, match="--dtype bfloat16"):
        JobConfig(input="in/", output="out/", precision="fp8", dtype="float32")
    assert JobConfig(input="in/", output="out/", precision="fp8").to_dict()["precision"] == "fp8"


def test_fp8_is_refused_on_cpu_naming_the_device_and_the_fix(tiny_model_dir):
    with pytest.raises(
        DeviceError, match=r"needs a CUDA GPU; this worker scores on cpu.*--precision auto"
    ):
        build_runner(tiny_model_dir, RunnerOptions(device="cpu", precision="fp8"))


def test_fp8_is_refused_on_a_gpu_older_than_ada(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    problem = fp8.unsupported(torch.device("cuda", 0))
    assert problem and "8.9 or newer" in problem and "NVIDIA A100 has 8.0" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.unsupported(torch.device("cuda", 0)) is None


def test_factory_builds_the_fp8_runner_only_when_asked(tiny_model_dir):
    built = build_runner(tiny_model_dir, RunnerOptions(device="cpu"))
    assert isinstance(built.runner, PaddedRunner)
    assert not isinstance(built.runner, Fp8Encoder)
    assert dataclasses.replace(RunnerOptions(), precision="fp8").precision == "fp8"

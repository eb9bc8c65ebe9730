"""FP8 scoring: the packed encoder with its layers' projections as float8 e4m3 GEMMs.

What is quantized, and how (one definition, ``quantize_rows``, for weights and activations):
- each encoder layer's four projection weights (QKV, attention output, feed-forward up and
  down), once at load, with one scale per output channel (row amax / 448);
- their inputs per token, with one scale per row, computed from the 16-bit activation the
  layer would otherwise feed to a 16-bit GEMM.
The GEMM accumulates in float32, scales by both, adds the bias and rounds to the runner's
16-bit dtype. Embeddings, attention (softmax included), LayerNorm statistics, the residual
stream, the pooler/classifier head, and any layer listed in ``layers_16bit`` stay 16-bit.

Two paths with that same math: ``cuda`` (``torch._scaled_mm`` with rowwise scales, on a GPU
of compute capability 8.9 or newer) and ``emulate`` (e4m3 values back in float32, then
``F.linear``; any device: the tests and bench/fp8_accuracy.py use it on CPU).

With the fused kernels (``kernels.add_layer_norm_e4m3_``, ``kernels.rows_e4m3``), the
add+LayerNorm kernel writes the next GEMM's FP8 input and its scales in the same pass, and the
GELU pass writes only the FP8 input of the down projection; the attention output is quantized
in one pass of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rerank_ray.runners import kernels, packed
from rerank_ray.runners.encoder import ACTIVATIONS, PackedEncoder

logger = logging.getLogger(__name__)

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
PATHS = ("cuda", "emulate")
# Layers the factory keeps 16-bit (indices; -1 is the last): with every layer in FP8 the
# trained model missed the ranking gate, with these two kept it met it (bench/README.md).
DEFAULT_LAYERS_16BIT: tuple[int, ...] = (0, -1)


class Fp8Rows(NamedTuple):
    """A matrix quantized per row: e4m3 values [rows, cols], float32 scales [rows, 1]
    (value = q * scale)."""

    q: torch.Tensor
    scale: torch.Tensor


class Fp8Weight(NamedTuple):
    """A projection weight quantized per output channel: e4m3 [out, in], float32 scales
    [1, out] (the layout ``torch._scaled_mm`` takes for its second operand's scales)."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_rows(x: torch.Tensor) -> Fp8Rows:
    """``x`` [rows, cols] to e4m3 with one scale per row, amax / 448: the largest magnitude of
    each row lands on the largest e4m3 value; round to nearest even. Zero rows get a tiny
    scale, not a division by zero."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    # Correctly rounded divisions by a tensor (by a Python float, CUDA multiplies by its
    # reciprocal: two roundings), so the Triton kernels reproduce both bit for bit.
    e4m3_max = amax.new_full((), E4M3_MAX)
    q = (x * torch.div(e4m3_max, amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return Fp8Rows(q, torch.div(amax, e4m3_max))


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """A Linear weight [out, in] with one scale per output channel."""
    q, scale = quantize_rows(w)
    return Fp8Weight(q, scale.view(1, -1))


def fp8_gemm(x: Fp8Rows, w: Fp8Weight, bias: torch.Tensor, out_dtype: torch.dtype, path: str):
    """``(x.q @ w.q^T) * x.scale * w.scale + bias``, accumulated in float32, in ``out_dtype``."""
    if path == "cuda":
        return torch._scaled_mm(
            x.q, w.q.t(), scale_a=x.scale, scale_b=w.scale, bias=bias, out_dtype=out_dtype
        )
    y = F.linear(x.q.float(), w.q.float()) * (x.scale * w.scale) + bias.float()
    return y.to(out_dtype)


def unsupported(device: torch.device) -> str | None:
    """None where FP8 GEMMs run on ``device``, else why not (naming the device)."""
    if device.type != "cuda":
        return f"needs a CUDA GPU; this worker scores on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, "
            f"Hopper); {name} has {major}.{minor}"
        )
    return None


class Fp8Encoder(PackedEncoder):
    """``PackedEncoder`` whose layers' projections run as FP8 GEMMs (module docstring).

    Options (keyword-only, with ``PackedEncoder``'s): ``path``: ``cuda`` or ``emulate``;
    ``layers_16bit``: indices of layers kept in 16 bits (e.g. ``(0, -1)``: first and last);
    ``fused_quantization``: quantize activations inside the Triton add+LayerNorm and GELU
    passes (needs ``fused_layer_norm``), else with PyTorch ops (same values, extra passes).
    """

    def _setup(
        self,
        cfg,
        weight,
        *,
        path: str = "cuda",
        layers_16bit: tuple[int, ...] = (),
        fused_quantization: bool = False,
        **options,
    ) -> None:
        super()._setup(cfg, weight, **options)
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
        if path == "cuda" and (problem := unsupported(self.device)):
            raise ValueError(f"the FP8 cuda path {problem}; use path='emulate'.")
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"FP8 GEMMs output float16/bfloat16, got dtype {self.dtype}.")
        if fused_quantization and not self.fused_layer_norm:
            raise ValueError("fused_quantization needs fused_layer_norm (the same kernel).")
        n = len(self._layers)
        if any(not -n <= i < n for i in layers_16bit):
            raise ValueError(f"layers_16bit {layers_16bit} out of range for {n} layers.")
        self.path = path
        self.layers_16bit = tuple(sorted({i % n for i in layers_16bit}))
        self.fused_quantization = fused_quantization
        for i, w in enumerate(self._layers):
            if i in self.layers_16bit:
                continue
            for name in ("qkv_w", "out_w", "up_w", "down_w"):
                shape = getattr(w, name).shape
                if path == "cuda" and (shape[0] % 16 or shape[1] % 16):
                    raise ValueError(f"FP8 GEMMs take sizes divisible by 16, got {name} {shape}.")
            self._layers[i] = dataclasses.replace(
                w,
                qkv_w=quantize_weight(w.qkv_w),
                out_w=quantize_weight(w.out_w),
                up_w=quantize_weight(w.up_w),
                down_w=quantize_weight(w.down_w),
            )
        up_16bit, act = self._up, ACTIVATIONS[cfg.hidden_act]
        gelu_in_kernel = fused_quantization and cfg.hidden_act == "gelu"

        def up(x: torch.Tensor, w, b: torch.Tensor):
            if not isinstance(w, Fp8Weight):
                return up_16bit(x, w, b)
            h = self._linear(x, w, b)
            # FP8 layers hand the down projection its input already quantized.
            if gelu_in_kernel:  # GELU and quantization in one pass; h is not written back
                return Fp8Rows(*kernels.rows_e4m3(h, gelu=True))
            return quantize_rows(act(h))

        self._up = up
        if fused_quantization:
            self._add_ln = _add_layer_norm_e4m3

    def _linear(self, x, w, b: torch.Tensor) -> torch.Tensor:
        if not isinstance(w, Fp8Weight):
            return F.linear(x, w, b)
        if not isinstance(x, Fp8Rows):  # quantized by the add+LayerNorm that produced x, or now
            x = getattr(x, "fp8_rows", None) or self._quantize(x)
        return fp8_gemm(x, w, b, self.dtype, self.path)

    def _quantize(self, x: torch.Tensor) -> Fp8Rows:
        if self.fused_quantization and x.stride(-1) == 1:
            return Fp8Rows(*kernels.rows_e4m3(x))
        return quantize_rows(x)


def _add_layer_norm_e4m3(y, x, weight, bias, eps: float) -> torch.Tensor:
    """``kernels.add_layer_norm_`` that also leaves the result's FP8 form on it, for the next
    GEMM (``Fp8Encoder._linear`` picks it up; any other consumer reads the 16-bit tensor)."""
    y, q, scale = kernels.add_layer_norm_e4m3_(y, x, weight, bias, eps)
    y.fp8_rows = Fp8Rows(q, scale)
    return y


def self_check(
    device: torch.device,
    dtype: torch.dtype,
    fused: bool,
    hidden: int = 96,
    intermediate: int = 160,
) -> tuple[str | None, bool]:
    """Run the FP8 GEMM (and with ``fused`` the FP8 quantization kernels, on rows of the
    model's ``hidden`` and ``intermediate`` widths: the variants its forward runs, compiled
    once) on small inputs against the emulated math: ``(problem, fused_ok)``. ``problem`` is
    None when the GEMM agrees, else why not (then FP8 cannot run here); ``fused_ok`` whether
    the kernels agree (else the runner quantizes with PyTorch ops). The factory calls it at
    actor start."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    try:
        x, w, b = quantize_rows(randn(37, 64)), quantize_weight(randn(48, 64)), randn(48)
        got = fp8_gemm(x, w, b, dtype, "cuda" if device.type == "cuda" else "emulate").float()
        want = fp8_gemm(x, w, b, torch.float32, "emulate")
    except (RuntimeError, TypeError) as e:  # no FP8 GEMM for these types on this device
        return f"torch._scaled_mm failed with {dtype} output: {type(e).__name__}: {e}", False
    err = ((got - want).abs() / (want.abs() + 1)).max().item()
    if not err <= (0.02 if dtype == torch.bfloat16 else 0.005):
        return f"torch._scaled_mm differs from the emulated FP8 GEMM by {err:.3g}", False
    if not fused:
        return None, False
    try:
        y, r, lw, lb = randn(37, hidden), randn(37, hidden), randn(hidden), randn(hidden)
        y, q, scale = kernels.add_layer_norm_e4m3_(y, r, lw, lb, 1e-5)
        ref = quantize_rows(y)
        a = randn(37, hidden)
        aq, as_ = kernels.rows_e4m3(a)
        h = randn(37, intermediate) * 3
        hq, hs = kernels.rows_e4m3(h, gelu=True)
        href = quantize_rows(kernels.gelu_(h.clone()))
    except Exception as e:  # compile or launch failure: report it, the caller falls back
        logger.warning("FP8 quantization kernels off, PyTorch ops instead: %s", e)
        return None, False
    kernel_results = (
        ("add+LayerNorm", (q, scale), ref),
        ("rows", (aq, as_), quantize_rows(a)),
        ("GELU", (hq, hs), href),
    )
    for name, (gq, gs), (wq, ws) in kernel_results:
        # equal, or one e4m3 step (1/8 relative) apart where float32 rounding differs at a tie
        want = wq.float() * ws
        err = ((gq.float() * gs - want).abs() / (want.abs() / 8 + ws / 512)).max().item()
        if not err <= 1.0:
            logger.warning("FP8 %s quantization kernel off: differs by %.3g steps", name, err)
            return None, False
    return None, True


def fp8_options(cfg, device: torch.device, dtype: torch.dtype, options) -> dict:
    """``Fp8Encoder`` options on ``device``: the packed runner's kernels (``kernel_options``),
    the cuda path, quantization fused where those kernels run and pass the FP8 self-check.
    Raises ``ValueError`` (with why) where the FP8 GEMM itself fails its check."""
    opts = packed.kernel_options(cfg, device, dtype, options)
    problem, fused_ok = self_check(
        device, dtype, opts["fused_layer_norm"], cfg.hidden_size, cfg.intermediate_size
    )
    if problem:
        raise ValueError(problem)
    return {
        **opts,
        "path": "cuda",
        "layers_16bit": DEFAULT_LAYERS_16BIT,
        "fused_quantization": fused_ok,
    }


def from_model(model, device: torch.device, dtype: torch.dtype, options) -> Fp8Encoder:
    """The FP8 runner of a loaded HF model."""
    return packed.from_model(model, device, dtype, options, encoder=Fp8Encoder, policy=fp8_options)


def from_checkpoint(model_dir, device: torch.device, dtype: torch.dtype, options):
    """The FP8 runner read straight from ``model_dir``, or None where the directory is not
    plainly one ``PackedEncoder.from_checkpoint`` reads."""
    return packed.from_checkpoint(
        model_dir, device, dtype, options, encoder=Fp8Encoder, policy=fp8_options
    )

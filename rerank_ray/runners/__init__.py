"""How a model scores: the ``Runner`` protocol, its typed options, and the one factory.

``build_runner(model_dir, options)`` is the only place that decides which runner scores a
model and with which kernels; it validates the options against the model and the device once.

- ``encoder.PackedEncoder``: the padding-free encoder (XLM-R, RoBERTa, BERT), on a GPU with the
  Triton kernels of ``kernels.py`` where they pass their self-check (``packed.py`` builds it).
- ``padded.PaddedRunner``: Hugging Face's own forward on padded batches, for every other
  model, and on CPU.
- ``fp8.Fp8Encoder``: the packed encoder with FP8 GEMMs, only when ``precision`` asks for it.
- ``int8_cpu.Int8CpuRunner``: ONNX Runtime with INT8 Linear layers on CPU, only when
  ``precision`` asks for it (the ``[cpu]`` extra).

Adding a backend is one module here and one branch in ``build_runner``; the scorer does not
change.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from rerank_ray.errors import RerankError

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float16", "bfloat16", "float32")
DEVICES = ("auto", "cuda", "cpu")
# How the weights are stored and multiplied; ``auto`` keeps today's dtype behaviour. Another
# backend adds its name here and its branch in ``build_runner``.
PRECISIONS = ("auto", "int8", "fp8")


class DeviceError(RerankError, RuntimeError):
    """The requested device is not there (e.g. ``--device cuda`` on a worker without a GPU)."""


class Runner(Protocol):
    """What the scorer calls. ``submit`` (optional) is the asynchronous form of ``score``."""

    padded: bool  # micro-batches cost rows x longest row (True) or the sum of lengths (False)

    def score(
        self, ids_flat: np.ndarray, offsets: np.ndarray, type_ids_flat: np.ndarray | None
    ) -> np.ndarray:
        """Raw logits (float32), one per sequence; ``offsets`` are Arrow list offsets."""
        ...


def check_precision(precision: str, dtype: str) -> None:
    """A ``ConfigError`` where ``precision`` and ``dtype`` cannot go together."""
    from rerank_ray.config import ConfigError

    if precision == "int8" and dtype not in ("auto", "float32"):
        raise ConfigError(
            f"`precision` int8 runs on CPU with float32 activations, but `dtype` is {dtype}: "
            "leave --dtype at auto (or float32), or pass --precision auto."
        )
    if precision == "fp8" and dtype == "float32":
        raise ConfigError(
            "`precision` fp8 keeps attention, LayerNorm and the head in 16 bits, but `dtype` "
            "is float32: pass --dtype bfloat16 (or auto), or --precision auto."
        )


@dataclass(frozen=True)
class RunnerOptions:
    """How to score, as the job config asks; validated when built."""

    device: str = "auto"  # cuda, cpu, or auto (cuda when this worker has a GPU)
    dtype: str = "auto"  # float16, bfloat16, float32, or auto (fp16 on GPU, fp32 on CPU)
    fused_kernels: bool = True  # GPU: Triton add+LayerNorm, attention and exact GELU
    fast_gelu: bool = False  # GPU: tanh GELU in the matmul epilogue (changes logits slightly)
    allow_pickle_weights: bool = False  # load pickle weights when no safetensors exist
    trust_remote_code: bool = False  # run the model repository's code
    precision: str = "auto"  # auto (the dtype's own GEMMs) or fp8 (e4m3 GEMMs, GPU cc >= 8.9)

    def __post_init__(self) -> None:
        from rerank_ray.config import ConfigError

        if self.device not in DEVICES:
            raise ConfigError(f"`device` is {self.device!r}; choose one of {', '.join(DEVICES)}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"`dtype` is {self.dtype!r}; choose one of {', '.join(DTYPES)}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"`precision` is {self.precision!r}; choose one of {', '.join(PRECISIONS)}."
            )
        check_precision(self.precision, self.dtype)

    @classmethod
    def from_job(cls, cfg) -> RunnerOptions:
        """The runner options of a ``JobConfig``."""
        return cls(
            device=cfg.device,
            dtype=cfg.dtype,
            fused_kernels=cfg.fused_kernels,
            fast_gelu=cfg.fast_gelu,
            allow_pickle_weights=cfg.allow_pickle_weights,
            trust_remote_code=cfg.trust_remote_code,
            precision=cfg.precision,
        )


@dataclass
class BuiltRunner:
    """A runner and how it was built (the scoring actor reports this)."""

    runner: Runner
    device: object  # torch.device
    dtype: object  # torch.dtype
    load_path: str  # "checkpoint" (read directly) or "transformers"
    seconds: dict[str, float] = field(default_factory=dict)  # load_model, build_runner


def pick_device(requested: str):
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ``DeviceError``."""
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError(
                "device is 'cuda' but this worker sees no GPU: schedule the scorer on a GPU "
                "node, or pass --device cpu."
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(requested: str, device):
    """``auto`` -> float16 on GPU (the reference's use_fp16), float32 on CPU."""
    import torch

    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        requested
    ]


def build_runner(model_dir: str | Path, options: RunnerOptions) -> BuiltRunner:
    """The runner for ``model_dir`` under ``options``.

    On a GPU, a plain XLM-R/RoBERTa/BERT checkpoint is read straight from ``config.json`` and
    safetensors into the packed encoder (no transformers import: seconds of actor start-up);
    any other model loads through transformers, then runs packed on a GPU where its type
    allows, else padded. On CPU the padded HF forward is the exact reference path.
    """
    from rerank_ray.runners import packed
    from rerank_ray.runners.padded import PaddedRunner
    from rerank_ray.runners.weights import SUPPORTED_MODEL_TYPES

    t0 = time.perf_counter()
    device = pick_device(options.device)
    if options.precision == "fp8":
        return _build_fp8(model_dir, options, device, t0)
    if options.precision == "int8":
        return _build_int8(model_dir, options, device, t0)
    dtype = pick_dtype(options.dtype, device)
    on_gpu = device.type == "cuda"

    def from_model(model):
        if on_gpu and model.config.model_type in SUPPORTED_MODEL_TYPES:
            return packed.from_model(model, device, dtype, options)
        return PaddedRunner(model, device)

    direct = packed.from_checkpoint if on_gpu else None
    return _load(model_dir, options, device, dtype, direct, from_model, t0)


def _load(model_dir, options: RunnerOptions, device, dtype, from_checkpoint, from_model, t0):
    """The runner ``from_checkpoint`` reads straight from ``model_dir`` (not with
    ``--trust-remote-code``; None: not plainly readable), else ``from_model`` of the model
    loaded through transformers; timed from ``t0``."""
    from rerank_ray.runners.padded import load_cross_encoder

    runner = None
    if from_checkpoint is not None and not options.trust_remote_code:
        runner = from_checkpoint(model_dir, device, dtype, options)
    load_path = "checkpoint" if runner is not None else "transformers"
    t_loaded = time.perf_counter()
    if runner is None:
        model = load_cross_encoder(
            model_dir,
            device=device,
            dtype=dtype,
            allow_pickle_weights=options.allow_pickle_weights,
            trust_remote_code=options.trust_remote_code,
        )
        t_loaded = time.perf_counter()
        runner = from_model(model)
    seconds = {
        "load_model": round(t_loaded - t0, 2),
        "build_runner": round(time.perf_counter() - t_loaded, 2),
    }
    return BuiltRunner(runner, device, dtype, load_path, seconds)


def _build_fp8(model_dir: str | Path, options: RunnerOptions, device, t0: float) -> BuiltRunner:
    """The FP8 runner, or a ``DeviceError`` where this device or model cannot run it: FP8 is
    only ever what was asked for, never a fallback or a default."""
    import torch

    from rerank_ray.config import ConfigError
    from rerank_ray.runners import fp8
    from rerank_ray.runners.weights import SUPPORTED_MODEL_TYPES

    if problem := fp8.unsupported(device):
        raise DeviceError(
            f"--precision fp8 {problem}: run it on an Ada or Hopper GPU (e.g. L4, L40S, "
            "H100, H200), or pass --precision auto."
        )
    # bfloat16 unless asked: rowwise-scaled FP8 GEMMs output bf16 on every FP8 GPU.
    dtype = torch.float16 if options.dtype == "float16" else torch.bfloat16

    def from_model(model):
        if model.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"--precision fp8 runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                f"cross-encoders; {model_dir} is {model.config.model_type!r}: pass "
                "--precision auto."
            )
        return fp8.from_model(model, device, dtype, options)

    try:
        return _load(model_dir, options, device, dtype, fp8.from_checkpoint, from_model, t0)
    except ValueError as e:  # the GEMM's self-check or the model's shapes refused FP8 here
        if isinstance(e, ConfigError):
            raise
        fix = "--dtype bfloat16, or " if dtype == torch.float16 else ""
        raise DeviceError(
            f"--precision fp8 cannot run on {torch.cuda.get_device_name(device)} with "
            f"{str(dtype).removeprefix('torch.')}: {e}. Pass {fix}--precision auto."
        ) from e


def _build_int8(model_dir: str | Path, options: RunnerOptions, device, t0: float) -> BuiltRunner:
    """The INT8 CPU runner (ONNX Runtime), or a ``DeviceError`` on a GPU worker: INT8 is
    only ever what was asked for."""
    import torch

    from rerank_ray.runners.int8_cpu import Int8CpuRunner

    if device.type != "cpu":
        raise DeviceError(
            f"--precision int8 runs on CPU (ONNX Runtime), but this worker scores on {device}: "
            "pass --device cpu, or leave --precision at auto on a GPU."
        )
    runner = Int8CpuRunner.from_model_dir(
        model_dir,
        allow_pickle_weights=options.allow_pickle_weights,
        trust_remote_code=options.trust_remote_code,
    )
    seconds = {"load_model": round(time.perf_counter() - t0, 2), "build_runner": 0.0}
    return BuiltRunner(runner, device, torch.float32, "onnx-int8", seconds)

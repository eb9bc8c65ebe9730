"""The packed runner's build: the kernel policy, and the encoder from a model or a checkpoint.

``kernel_options`` is the one kernel policy for the padding-free encoder (``encoder.py``);
``from_model`` and ``from_checkpoint`` build it (or a subclass, with its own policy: ``fp8.py``)
from a loaded Hugging Face model or straight from a model directory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from rerank_ray.runners import kernels
from rerank_ray.runners.checkpoint import checkpoint_config
from rerank_ray.runners.encoder import PackedEncoder

logger = logging.getLogger(__name__)

# (model config, device, dtype, RunnerOptions) -> the encoder's keyword options
Policy = Callable[..., dict]


def kernel_options(cfg, device: torch.device, dtype: torch.dtype, options) -> dict:
    """``PackedEncoder`` options for a model config under ``RunnerOptions``.

    The tanh-GELU epilogue (``fast_gelu``) moves logits off HF's exact GELU, so it is opt-in.
    The Triton kernels keep HF's numerics, so they are on where Triton runs and the model's
    shapes allow, unless their self-check fails on this GPU: then eager ops, with a warning.
    The attention kernel takes 16-bit inputs (float32 would run its matmuls in TF32).
    """
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gelu_epilogue = options.fast_gelu and cfg.hidden_act.startswith("gelu")
    half = dtype in (torch.float16, torch.bfloat16)
    triton_attention = half and kernels.attention_supported(head_dim)
    fused = options.fused_kernels and kernels.available(device)
    checked_head = head_dim if triton_attention else None
    if fused and (problem := kernels.self_check(device, dtype, checked_head, cfg.hidden_size)):
        logger.warning("Fused kernels off on this GPU, eager ops instead: %s", problem)
        fused = False
    return {
        "attention": "triton" if fused and triton_attention else "auto",
        "gelu_epilogue": gelu_epilogue,
        "fused_layer_norm": fused,
        # the exact GELU as a Triton pass, for 16-bit weights (within one ulp of PyTorch's)
        "triton_gelu": fused and half and not gelu_epilogue and cfg.hidden_act == "gelu",
    }


def from_model(
    model,
    device: torch.device,
    dtype: torch.dtype,
    options,
    *,
    encoder: type[PackedEncoder] = PackedEncoder,
    policy: Policy = kernel_options,
) -> PackedEncoder:
    """The packed runner (an ``encoder``) of a loaded HF model, with the options ``policy``
    picks."""
    return encoder(
        model, device=device, dtype=dtype, **policy(model.config, device, dtype, options)
    )


def from_checkpoint(
    model_dir: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    options,
    *,
    encoder: type[PackedEncoder] = PackedEncoder,
    policy: Policy = kernel_options,
) -> PackedEncoder | None:
    """The packed runner (an ``encoder``) read straight from ``model_dir`` (no transformers),
    with the options ``policy`` picks; None where the directory is not plainly one
    ``PackedEncoder.from_checkpoint`` reads."""
    config = checkpoint_config(Path(model_dir))
    if config is None:
        return None
    return encoder.from_checkpoint(
        model_dir,
        device=device,
        dtype=dtype,
        config=config,
        **policy(config, device, dtype, options),
    )

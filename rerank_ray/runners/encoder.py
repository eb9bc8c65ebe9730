"""The padding-free encoder: a packed micro-batch through the transformer, one logit per sequence.

A micro-batch arrives as the tokenize stage emits it: every sequence's token ids back to back
(``ids_flat``) and Arrow list offsets (``offsets``, i.e. cu_seqlens, starting at 0). The encoder
runs on exactly those tokens: no padding, so no FLOPs or memory are spent on pad positions.
Attention stays within each sequence through ``torch.nn.attention.varlen.varlen_attn`` (flash
attention over cu_seqlens) on CUDA; elsewhere, and where that kernel is missing, it scatters
q/k/v into a padded block for SDPA and gathers the result back (exact; the CPU reference).

Weights are taken once from a loaded Hugging Face ``XLMRobertaForSequenceClassification``,
``RobertaForSequenceClassification`` or ``BertForSequenceClassification`` (q/k/v fused into one
projection), so the result equals that model's padded forward up to float rounding. The first
token of each sequence feeds the model's own classifier head; one raw logit per sequence.

Its parts: ``weights.py`` (the configs it takes and its tensors), ``staging.py`` (the
micro-batch's one input buffer), ``attention.py`` (the attention backends), ``kernels.py``
(the Triton kernels); ``packed.py`` decides which of its options a model gets.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from rerank_ray.runners import kernels, staging
from rerank_ray.runners.attention import ATTENTION_BACKENDS, attend, pick_backend
from rerank_ray.runners.checkpoint import checkpoint_config, checkpoint_tensors
from rerank_ray.runners.weights import check_config, read_weights

# In place on the feed-forward's intermediate (same kernels and results as F.gelu / F.relu):
# no second tokens x intermediate buffer, which lowers the peak memory of a forward.
ACTIVATIONS = {
    "gelu": lambda h: torch.ops.aten.gelu_(h),
    "gelu_new": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "relu": torch.relu_,
}


def _add_layer_norm(
    y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Residual add then LayerNorm, eagerly (``kernels.add_layer_norm_`` fuses them)."""
    return F.layer_norm(y + residual, (y.shape[-1],), weight, bias, eps)


def _linear_tanh_gelu_epilogue(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bias + GELU in cuBLASLt's matmul epilogue: the tanh approximation (``--fast-gelu``)."""
    return torch._addmm_activation(b, x, w.t(), use_gelu=True)


class PendingScores:
    """Scores of a submitted micro-batch; ``result()`` waits for the device and returns them."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self._host = host
        self._event = event

    def result(self) -> np.ndarray:
        """The raw logits, float32, one per sequence in submission order."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class PackedEncoder:
    """Padding-free runner: ``score(ids_flat, offsets, type_ids_flat) -> float32 logits``.

    Same call as the padded runner. ``submit`` is the asynchronous form: it stages the inputs
    in pinned memory, copies them without blocking and queues the whole forward, so the host
    prepares the next micro-batch while the device computes this one.
    """

    padded = False  # micro-batches cost the sum of their lengths, not rows x longest

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **options,
    ) -> None:
        """Copy the weights of a loaded HF sequence-classification ``model``.

        ``device``/``dtype`` default to the model's. ``options`` (keyword-only, defaults in
        ``_setup``, shared with ``from_checkpoint``): ``attention``: ``varlen`` (CUDA flash
        attention over cu_seqlens), ``triton`` (``kernels.varlen_attention``: flash attention
        reading the fused QKV output in place, tiled for short sequences), ``sdpa`` (padded per
        micro-batch, exact, any device) or ``auto`` (varlen where available with fp16/bf16,
        else sdpa).
        ``gelu_epilogue`` computes bias + GELU inside the feed-forward matmul (cuBLASLt
        epilogue, CUDA only); that GELU is the tanh approximation, so for ``hidden_act="gelu"``
        models it changes logits slightly (bench/ reports by how much): off by default.
        ``fused_layer_norm`` runs each residual add + LayerNorm as one Triton kernel
        (``kernels.py``; CUDA, or CPU under ``TRITON_INTERPRET=1``).
        ``first_token_last_layer``: the classifier head reads only each sequence's first token,
        so the last layer runs its attention query, output projection, LayerNorms and
        feed-forward block for that token alone (keys and values still come from every
        token). The same math on fewer rows: exact up to float rounding, ~3% fewer FLOPs
        for 24 layers. On by default.
        ``triton_gelu`` runs the exact (erf) GELU of ``hidden_act="gelu"`` models as
        ``kernels.gelu_`` (a cheaper erf, exact to 1.5e-7; CUDA, or CPU under
        ``TRITON_INTERPRET=1``).
        """
        first_param = next(model.parameters())
        self._setup(
            model.config,
            model.state_dict().__getitem__,
            device=torch.device(device) if device is not None else first_param.device,
            dtype=dtype if dtype is not None else first_param.dtype,
            **options,
        )

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device,
        dtype: torch.dtype,
        config: SimpleNamespace | None = None,
        **options,
    ) -> PackedEncoder | None:
        """The encoder straight from a model directory's ``config.json`` and safetensors
        weights, each tensor read once onto ``device``: no transformers import and no HF model
        built first (seconds of a scoring actor's start). The names are the checkpoint's own,
        the ones ``__init__`` reads from a loaded HF model, so both give the same weights.

        None (the caller loads the model through transformers instead) unless the directory
        is plainly one this class reads: a supported ``architectures`` entry, every setting it
        uses written out in ``config.json`` (no library default is guessed), safetensors
        weights holding every tensor it needs. ``config``: ``checkpoint_config(model_dir)``
        when the caller has read it already. ``options`` as for ``__init__``."""
        config = config or checkpoint_config(Path(model_dir))
        if config is None:
            return None
        tensors = checkpoint_tensors(Path(model_dir), device)
        if tensors is None:
            return None
        self = cls.__new__(cls)
        try:
            self._setup(config, tensors, device=torch.device(device), dtype=dtype, **options)
        except (KeyError, ValueError):  # a tensor missing, a setting this class refuses:
            return None  # transformers loads it, and the caller decides as before
        return self

    def _setup(
        self,
        cfg,
        weight,
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "auto",
        gelu_epilogue: bool = False,
        fused_layer_norm: bool = False,
        first_token_last_layer: bool = True,
        triton_gelu: bool = False,
    ) -> None:
        """``cfg``: the model's config (attributes as HF's); ``weight(name)``: the tensor of a
        state-dict name (KeyError when missing)."""
        check_config(cfg)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(ACTIVATIONS)}."
            )
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}.")

        self.device = device
        self.dtype = dtype
        self._eps = float(cfg.layer_norm_eps)
        self._heads = int(cfg.num_attention_heads)
        self._hidden = int(cfg.hidden_size)
        w = read_weights(cfg, weight, device, dtype)
        self._word, self._pos, self._type, self._emb_ln = w.word, w.pos, w.type, w.emb_ln
        self._layers, self._head, self._out = w.layers, w.head, w.out
        self._pad_idx, self.max_tokens = w.pad_idx, w.max_tokens

        on_cuda = self.device.type == "cuda"
        self.attention = pick_backend(attention, device, dtype, self._hidden // self._heads)
        if gelu_epilogue and (not on_cuda or not cfg.hidden_act.startswith("gelu")):
            raise ValueError("gelu_epilogue needs CUDA and a GELU model; leave it off here.")
        if triton_gelu:
            if gelu_epilogue or cfg.hidden_act != "gelu" or not kernels.available(self.device):
                raise ValueError(
                    f"triton_gelu runs the exact GELU of hidden_act='gelu' models with Triton on "
                    f"CUDA, without gelu_epilogue (hidden_act {cfg.hidden_act!r}, device "
                    f"{self.device}, gelu_epilogue={gelu_epilogue}); leave it off here."
                )
            self._up = lambda x, w, b: kernels.gelu_(F.linear(x, w, b))
        elif gelu_epilogue:
            self._up = _linear_tanh_gelu_epilogue
        else:
            act = ACTIVATIONS[cfg.hidden_act]
            self._up = lambda x, w, b: act(F.linear(x, w, b))
        self._pin = on_cuda
        if fused_layer_norm:
            if not kernels.available(self.device):
                raise ValueError(
                    f"fused_layer_norm needs Triton and CUDA (device {self.device}); "
                    "leave it off here."
                )
            self._add_ln = kernels.add_layer_norm_
        else:
            self._add_ln = _add_layer_norm
        self.fused_layer_norm = fused_layer_norm
        self.triton_gelu = triton_gelu
        self.first_token_last_layer = bool(first_token_last_layer) and bool(self._layers)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """An encoder layer's projection (QKV, attention output, feed-forward down; the up
        projection is ``_up``'s): where ``fp8.Fp8Encoder`` puts its FP8 GEMMs."""
        return F.linear(x, w, b)

    def _forward(
        self, dev: torch.Tensor, n_tok: int, n_seq: int, max_len: int, has_types: bool, n_extra: int
    ):
        ids, pos, cu, type_ids, extra = staging.parts(dev, n_tok, n_seq, has_types, n_extra)
        x = F.embedding(ids, self._word) + F.embedding(pos, self._pos)
        # without type ids, HF's default: all zero
        x = x + (F.embedding(type_ids, self._type) if type_ids is not None else self._type[0])
        last_extra = extra
        prune = self.first_token_last_layer
        if prune and self.attention == "triton":  # the work list, then the first-block one
            extra, last_extra = extra[: -2 * n_seq], extra[-2 * n_seq :]
        x = F.layer_norm(x, (self._hidden,), *self._emb_ln, self._eps)
        for i, w in enumerate(self._layers):
            qkv = self._linear(x, w.qkv_w, w.qkv_b)
            if prune and i == len(self._layers) - 1:
                # Only the first tokens go on (all the head reads): their queries against
                # every token's keys and values, then the rest of the layer on B rows.
                attn = attend(self.attention, qkv, cu, max_len, last_extra, self._heads, True)
                x = x.index_select(0, cu[:-1])
            else:
                attn = attend(self.attention, qkv, cu, max_len, extra, self._heads)
            x = self._add_ln(self._linear(attn, w.out_w, w.out_b), x, w.ln1_w, w.ln1_b, self._eps)
            h = self._up(x, w.up_w, w.up_b)
            x = self._add_ln(self._linear(h, w.down_w, w.down_b), x, w.ln2_w, w.ln2_b, self._eps)
        first = x if prune else x.index_select(0, cu[:-1])
        pooled = torch.tanh(F.linear(first, *self._head))
        return F.linear(pooled, *self._out).view(n_seq).float()

    @torch.inference_mode()
    def submit(
        self,
        ids_flat: np.ndarray,
        offsets: np.ndarray,
        type_ids_flat: np.ndarray | None = None,
    ) -> PendingScores:
        """Queue one micro-batch; returns at once on CUDA. Raises on bad input, and
        ``torch.cuda.OutOfMemoryError`` here (not in ``result``) when memory runs out."""
        host, *sizes = staging.stage(
            ids_flat,
            offsets,
            type_ids_flat,
            max_tokens=self.max_tokens,
            pad_idx=self._pad_idx,
            attention=self.attention,
            first_blocks=self.first_token_last_layer,
            pin=self._pin,
        )
        dev = host.to(self.device, non_blocking=True)
        logits = self._forward(dev, *sizes)
        if not self._pin:
            return PendingScores(logits.cpu(), None)
        out = torch.empty(logits.shape[0], dtype=torch.float32, pin_memory=True)
        out.copy_(logits, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingScores(out, done)

    def score(
        self,
        ids_flat: np.ndarray,
        offsets: np.ndarray,
        type_ids_flat: np.ndarray | None = None,
    ) -> np.ndarray:
        """Raw logits (float32, one per sequence) of one packed micro-batch."""
        return self.submit(ids_flat, offsets, type_ids_flat).result()

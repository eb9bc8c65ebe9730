"""The padding-free runner: packed tokens, variable-length attention, Triton kernels on GPU.

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from rerank_ray.runners import kernels
from rerank_ray.runners.checkpoint import checkpoint_config, checkpoint_tensors

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("xlm-roberta", "roberta", "bert")
ATTENTION_BACKENDS = ("auto", "varlen", "triton", "sdpa")
_ROBERTA_LIKE = ("xlm-roberta", "roberta")
# In place on the feed-forward's intermediate (same kernels and results as F.gelu / F.relu):
# no second tokens x intermediate buffer, which lowers the peak memory of a forward.
_ACTIVATIONS = {
    "gelu": lambda h: torch.ops.aten.gelu_(h),
    "gelu_new": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "gelu_pytorch_tanh": lambda h: torch.ops.aten.gelu_(h, approximate="tanh"),
    "relu": torch.relu_,
}


def varlen_attention_available() -> bool:
    """Whether this PyTorch has ``torch.nn.attention.varlen.varlen_attn`` and a CUDA device."""
    return _varlen_attn() is not None and torch.cuda.is_available()


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@dataclass(frozen=True)
class _LayerWeights:
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


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
        else sdpa). ``compile`` fuses each residual add with its LayerNorm through
        ``torch.compile`` (dynamic shapes).
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
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"PackedEncoder supports model types {SUPPORTED_MODEL_TYPES}, got "
                f"{cfg.model_type!r}; use the padded runner for this model."
            )
        if cfg.num_labels != 1:
            raise ValueError(
                f"A reranker has one output logit; this model has num_labels={cfg.num_labels}."
            )
        if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(
                f"Only absolute position embeddings are supported, got "
                f"{cfg.position_embedding_type!r}; use the padded runner for this model."
            )
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"Unsupported hidden_act {cfg.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}."
            )
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}.")

        self.device = device
        self.dtype = dtype
        self._eps = float(cfg.layer_norm_eps)
        self._heads = int(cfg.num_attention_heads)
        self._hidden = int(cfg.hidden_size)
        roberta_like = cfg.model_type in _ROBERTA_LIKE
        # XLM-R/RoBERTa number positions from padding_idx + 1 and skip pad tokens.
        self._pad_idx = int(cfg.pad_token_id) if roberta_like else None
        base = "roberta." if roberta_like else "bert."
        offset = self._pad_idx + 1 if roberta_like else 0
        self.max_tokens = int(cfg.max_position_embeddings) - offset

        def t(name: str) -> torch.Tensor:
            return weight(name).detach().to(device=self.device, dtype=self.dtype).contiguous()

        def cat(*names: str) -> torch.Tensor:
            return torch.cat([t(n) for n in names])

        emb = base + "embeddings."
        self._word = t(emb + "word_embeddings.weight")
        self._pos = t(emb + "position_embeddings.weight")
        self._type = t(emb + "token_type_embeddings.weight")
        self._emb_ln = (t(emb + "LayerNorm.weight"), t(emb + "LayerNorm.bias"))
        self._layers = []
        for i in range(int(cfg.num_hidden_layers)):
            p = f"{base}encoder.layer.{i}."
            sa, ao = p + "attention.self.", p + "attention.output."
            self._layers.append(
                _LayerWeights(
                    qkv_w=cat(sa + "query.weight", sa + "key.weight", sa + "value.weight"),
                    qkv_b=cat(sa + "query.bias", sa + "key.bias", sa + "value.bias"),
                    out_w=t(ao + "dense.weight"),
                    out_b=t(ao + "dense.bias"),
                    ln1_w=t(ao + "LayerNorm.weight"),
                    ln1_b=t(ao + "LayerNorm.bias"),
                    up_w=t(p + "intermediate.dense.weight"),
                    up_b=t(p + "intermediate.dense.bias"),
                    down_w=t(p + "output.dense.weight"),
                    down_b=t(p + "output.dense.bias"),
                    ln2_w=t(p + "output.LayerNorm.weight"),
                    ln2_b=t(p + "output.LayerNorm.bias"),
                )
            )
        if roberta_like:  # classifier head: dense -> tanh -> out_proj on the first token
            self._head = (t("classifier.dense.weight"), t("classifier.dense.bias"))
            self._out = (t("classifier.out_proj.weight"), t("classifier.out_proj.bias"))
        else:  # BERT: pooler (dense -> tanh) on the first token, then the classifier
            try:
                self._head = (t(base + "pooler.dense.weight"), t(base + "pooler.dense.bias"))
            except KeyError:
                raise ValueError(
                    "BERT model has no pooler; cannot reproduce its classifier head."
                ) from None
            self._out = (t("classifier.weight"), t("classifier.bias"))

        on_cuda = self.device.type == "cuda"
        half = self.dtype in (torch.float16, torch.bfloat16)
        if attention == "auto":
            attention = "varlen" if (on_cuda and half and _varlen_attn() is not None) else "sdpa"
        if attention == "varlen" and (not on_cuda or _varlen_attn() is None):
            raise ValueError(
                "attention='varlen' needs CUDA and torch.nn.attention.varlen.varlen_attn "
                f"(device {self.device}, torch {torch.__version__}); use attention='sdpa'."
            )
        if attention == "triton":
            head_dim = self._hidden // self._heads
            if not (kernels.available(self.device) and kernels.attention_supported(head_dim)):
                raise ValueError(
                    f"attention='triton' needs Triton, CUDA and a head size of 16, 32, 64 or 128 "
                    f"(device {self.device}, head size {head_dim}); use 'varlen' or 'sdpa'."
                )
        self.attention = attention
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
            act = _ACTIVATIONS[cfg.hidden_act]
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

    # --- host side --------------------------------------------------------------------------
    def _stage(
        self, ids_flat: np.ndarray, offsets: np.ndarray, type_ids_flat: np.ndarray | None
    ) -> tuple[torch.Tensor, int, int, int, bool, int]:
        """Validate and pack every int input of a micro-batch into one int32 host buffer.

        Layout: ids[T] | positions[T] | cu_seqlens[B+1] | (type ids[T]) | extra, where extra
        is row[T] | col[T] for SDPA, the kernel's work list for the Triton attention (then,
        with ``first_token_last_layer``, a list of each sequence's first row block), else
        empty. One buffer means one host-to-device copy.
        """
        offsets = np.asarray(offsets)
        ids_flat = np.asarray(ids_flat)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0:
            raise ValueError("offsets must be 1-D Arrow list offsets starting at 0, length B+1.")
        lengths = np.diff(offsets)
        n_seq, n_tok = len(lengths), int(offsets[-1])
        if n_tok != len(ids_flat):
            raise ValueError(f"offsets end at {n_tok} but ids_flat has {len(ids_flat)} tokens.")
        if lengths.min() < 1:
            raise ValueError("every sequence needs at least one token (found an empty one).")
        max_len = int(lengths.max())
        if max_len > self.max_tokens:
            raise ValueError(
                f"a sequence has {max_len} tokens; this model takes at most {self.max_tokens}. "
                "Lower max_length in the tokenize stage."
            )
        has_types = type_ids_flat is not None
        if has_types and len(type_ids_flat) != n_tok:
            raise ValueError(f"type_ids_flat has {len(type_ids_flat)} entries, ids {n_tok}.")
        if self.attention == "triton":
            work = kernels.attention_work(lengths)
            if self.first_token_last_layer:  # then each sequence's first row block only
                work = np.concatenate([work, kernels.attention_work(np.minimum(lengths, 1))])
            n_extra = len(work)
        else:
            n_extra = 2 * n_tok if self.attention == "sdpa" else 0
        size = 2 * n_tok + n_seq + 1 + (n_tok if has_types else 0) + n_extra
        host = torch.empty(size, dtype=torch.int32, pin_memory=self._pin)
        buf = host.numpy()
        starts = offsets[:-1]
        col = np.arange(n_tok, dtype=np.int64) - np.repeat(starts, lengths)
        buf[:n_tok] = ids_flat
        if self._pad_idx is None:
            buf[n_tok : 2 * n_tok] = col
        else:  # HF create_position_ids_from_input_ids, restarted at every sequence
            not_pad = ids_flat != self._pad_idx
            running = np.cumsum(not_pad, dtype=np.int64)
            before = np.concatenate(([0], running))[starts]
            buf[n_tok : 2 * n_tok] = (running - np.repeat(before, lengths)) * not_pad
            buf[n_tok : 2 * n_tok] += self._pad_idx
        at = 2 * n_tok
        buf[at : at + n_seq + 1] = offsets
        at += n_seq + 1
        if has_types:
            buf[at : at + n_tok] = type_ids_flat
            at += n_tok
        if self.attention == "triton":
            buf[at:] = work
        elif self.attention == "sdpa":
            buf[at : at + n_tok] = np.repeat(np.arange(n_seq), lengths)
            buf[at + n_tok : at + 2 * n_tok] = col
        return host, n_tok, n_seq, max_len, has_types, n_extra

    # --- device side ------------------------------------------------------------------------
    def _attention(
        self, qkv: torch.Tensor, cu: torch.Tensor, max_len: int, extra: torch.Tensor,
        first_only: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """Attention output of every token ([T, hidden]), or with ``first_only`` of each
        sequence's first token only ([B, hidden]; queries from those tokens, keys and values
        from all)."""
        n_tok = qkv.shape[0]
        n_seq = cu.shape[0] - 1
        firsts = cu[:-1]
        if self.attention == "triton":  # extra: the work list for these queries
            out = kernels.varlen_attention(qkv, cu, self._heads, work=extra)
            # with first_only, only the first row blocks were written
            return out.index_select(0, firsts) if first_only else out
        qkv = qkv.view(n_tok, 3, self._heads, self._hidden // self._heads)
        if self.attention == "varlen":
            q, k, v = qkv.unbind(1)
            if not first_only:
                out = _varlen_attn()(q, k, v, cu, cu, max_len, max_len)
                return out.reshape(n_tok, self._hidden)
            cu_q = torch.arange(n_seq + 1, device=cu.device, dtype=cu.dtype)
            out = _varlen_attn()(q.index_select(0, firsts), k, v, cu_q, cu, 1, max_len)
            return out.reshape(n_seq, self._hidden)
        row, col = extra.view(2, n_tok).long()
        padded = qkv.new_zeros(n_seq, max_len, 3, self._heads, qkv.shape[-1])
        padded[row, col] = qkv
        q, k, v = (padded[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, L, d)
        lengths = (cu[1:] - cu[:-1]).long()
        keep = torch.arange(max_len, device=qkv.device)[None, :] < lengths[:, None]
        if first_only:
            out = F.scaled_dot_product_attention(q[:, :, :1], k, v, attn_mask=keep[:, None, None])
            return out.reshape(n_seq, self._hidden)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return out.transpose(1, 2)[row, col].reshape(n_tok, self._hidden)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """An encoder layer's projection (QKV, attention output, feed-forward down; the up
        projection is ``_up``'s): where ``fp8.Fp8Encoder`` puts its FP8 GEMMs."""
        return F.linear(x, w, b)

    def _forward(
        self, dev: torch.Tensor, n_tok: int, n_seq: int, max_len: int, has_types: bool, n_extra: int
    ):
        ids, pos = dev[:n_tok], dev[n_tok : 2 * n_tok]
        at = 2 * n_tok
        cu = dev[at : at + n_seq + 1]
        at += n_seq + 1
        x = F.embedding(ids, self._word) + F.embedding(pos, self._pos)
        if has_types:
            x = x + F.embedding(dev[at : at + n_tok], self._type)
            at += n_tok
        else:  # HF's default token_type_ids are all zero
            x = x + self._type[0]
        extra = last_extra = dev[at : at + n_extra]
        prune = self.first_token_last_layer
        if prune and self.attention == "triton":  # the work list, then the first-block one
            extra, last_extra = extra[: -2 * n_seq], extra[-2 * n_seq :]
        x = F.layer_norm(x, (self._hidden,), *self._emb_ln, self._eps)
        for i, w in enumerate(self._layers):
            qkv = self._linear(x, w.qkv_w, w.qkv_b)
            if prune and i == len(self._layers) - 1:
                # Only the first tokens go on (all the head reads): their queries against
                # every token's keys and values, then the rest of the layer on B rows.
                attn = self._attention(qkv, cu, max_len, last_extra, first_only=True)
                x = x.index_select(0, cu[:-1])
            else:
                attn = self._attention(qkv, cu, max_len, extra)
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
        host, *sizes = self._stage(ids_flat, offsets, type_ids_flat)
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


# --- the kernel policy: which options a packed runner gets ---------------------------------
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
    if fused and (problem := kernels.self_check(device, dtype, checked_head)):
        logger.warning("Fused kernels off on this GPU, eager ops instead: %s", problem)
        fused = False
    return {
        "attention": "triton" if fused and triton_attention else "auto",
        "gelu_epilogue": gelu_epilogue,
        "fused_layer_norm": fused,
        # the exact GELU as a Triton pass, for 16-bit weights (within one ulp of PyTorch's)
        "triton_gelu": fused and half and not gelu_epilogue and cfg.hidden_act == "gelu",
    }


def from_model(model, device: torch.device, dtype: torch.dtype, options) -> PackedEncoder:
    """The packed runner of a loaded HF model, with the kernels ``kernel_options`` picks."""
    return PackedEncoder(
        model, device=device, dtype=dtype, **kernel_options(model.config, device, dtype, options)
    )


def from_checkpoint(
    model_dir: str | Path, device: torch.device, dtype: torch.dtype, options
) -> PackedEncoder | None:
    """The packed runner read straight from ``model_dir`` (no transformers), or None where
    the directory is not plainly one ``PackedEncoder.from_checkpoint`` reads."""
    config = checkpoint_config(Path(model_dir))
    if config is None:
        return None
    return PackedEncoder.from_checkpoint(
        model_dir,
        device=device,
        dtype=dtype,
        config=config,
        **kernel_options(config, device, dtype, options),
    )

"""What the packed encoder reads from a model: the configs it takes, and its weights by role.

Weights are looked up by the state-dict names of a Hugging Face
``XLMRobertaForSequenceClassification``, ``RobertaForSequenceClassification`` or
``BertForSequenceClassification``, so a loaded model and a checkpoint read without transformers
give the same tensors; q/k/v are fused into one projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rerank_ray.runners.checkpoint import ROBERTA_LIKE

SUPPORTED_MODEL_TYPES = ("xlm-roberta", "roberta", "bert")


def check_config(cfg) -> None:
    """A ``ValueError`` (naming the fix) unless ``cfg`` (attributes as HF's config) is a
    reranker this encoder reproduces: a supported model type, one logit, absolute positions."""
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


@dataclass(frozen=True)
class LayerWeights:
    """One encoder layer's tensors (Linear weights [out, in], as ``F.linear`` takes them)."""

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


@dataclass(frozen=True)
class EncoderWeights:
    """Every tensor of the encoder on its device and dtype, and how it numbers positions."""

    word: torch.Tensor
    pos: torch.Tensor
    type: torch.Tensor
    emb_ln: tuple[torch.Tensor, torch.Tensor]
    layers: list[LayerWeights]
    head: tuple[torch.Tensor, torch.Tensor]  # dense -> tanh on the first token
    out: tuple[torch.Tensor, torch.Tensor]  # the classifier's projection to one logit
    pad_idx: int | None  # XLM-R/RoBERTa: positions start after it, pad tokens skipped
    max_tokens: int  # the longest sequence the position embeddings cover


def read_weights(
    cfg,
    weight: Callable[[str], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> EncoderWeights:
    """The encoder's tensors, each ``weight(name)`` (KeyError when missing) moved to ``device``
    and ``dtype``. ``cfg`` passed ``check_config``."""
    roberta_like = cfg.model_type in ROBERTA_LIKE
    # XLM-R/RoBERTa number positions from padding_idx + 1 and skip pad tokens.
    pad_idx = int(cfg.pad_token_id) if roberta_like else None
    base = "roberta." if roberta_like else "bert."
    offset = pad_idx + 1 if roberta_like else 0

    def t(name: str) -> torch.Tensor:
        return weight(name).detach().to(device=device, dtype=dtype).contiguous()

    def cat(*names: str) -> torch.Tensor:
        return torch.cat([t(n) for n in names])

    emb = base + "embeddings."
    word = t(emb + "word_embeddings.weight")
    pos = t(emb + "position_embeddings.weight")
    type_ = t(emb + "token_type_embeddings.weight")
    emb_ln = (t(emb + "LayerNorm.weight"), t(emb + "LayerNorm.bias"))
    layers = []
    for i in range(int(cfg.num_hidden_layers)):
        p = f"{base}encoder.layer.{i}."
        sa, ao = p + "attention.self.", p + "attention.output."
        layers.append(
            LayerWeights(
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
        head = (t("classifier.dense.weight"), t("classifier.dense.bias"))
        out = (t("classifier.out_proj.weight"), t("classifier.out_proj.bias"))
    else:  # BERT: pooler (dense -> tanh) on the first token, then the classifier
        try:
            head = (t(base + "pooler.dense.weight"), t(base + "pooler.dense.bias"))
        except KeyError:
            raise ValueError(
                "BERT model has no pooler; cannot reproduce its classifier head."
            ) from None
        out = (t("classifier.weight"), t("classifier.bias"))
    max_tokens = int(cfg.max_position_embeddings) - offset
    return EncoderWeights(word, pos, type_, emb_ln, layers, head, out, pad_idx, max_tokens)

"""Load a Hugging Face cross-encoder and run its padded forward pass.

The runner interface is shared with the padding-free encoder (``encoder.py``):
``runner.score(ids_flat, offsets, type_ids_flat) -> float32 logits``, one per sequence,
where ``offsets`` are Arrow list offsets (cu_seqlens) into ``ids_flat``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rerank_ray.storage import ModelLoadError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pick_device(requested: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device is 'cuda' but this worker sees no GPU: schedule the scorer on a GPU "
                "node (num_gpus=1), or pass --device cpu."
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto`` -> float16 on GPU (the reference's use_fp16), float32 on CPU."""
    if requested == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def load_cross_encoder(
    model_dir: str | Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle_weights: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load an ``AutoModelForSequenceClassification`` with one output logit, in eval mode."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if getattr(config, "num_labels", 1) != 1:
        raise ModelLoadError(
            f"Model {model_dir} has {config.num_labels} output labels; a reranker needs "
            "exactly one relevance logit per pair (e.g. BAAI/bge-reranker-v2-m3)."
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        dtype=dtype,
        use_safetensors=None if allow_pickle_weights else True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device).eval()


def pad_packed(
    ids_flat: np.ndarray, offsets: np.ndarray, pad_value: int
) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows -> (padded [rows, longest] matrix, attention mask), right padding."""
    lengths = np.diff(offsets)
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    padded = np.full((len(lengths), width), pad_value, dtype=np.int64)
    # Boolean assignment fills row by row, which is exactly the packed order.
    padded[mask] = ids_flat[offsets[0] : offsets[-1]]
    return padded, mask


class PaddedRunner:
    """The reference path: HF's own forward on a right-padded batch with an attention mask."""

    padded = True

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.inference_mode()
    def score(
        self, ids_flat: np.ndarray, offsets: np.ndarray, type_ids_flat: np.ndarray | None
    ) -> np.ndarray:
        ids, mask = pad_packed(ids_flat, offsets, self.pad_id)
        inputs = {
            "input_ids": torch.from_numpy(ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)).to(
                self.device, non_blocking=True
            ),
        }
        if type_ids_flat is not None:
            types, _ = pad_packed(type_ids_flat, offsets, 0)
            inputs["token_type_ids"] = torch.from_numpy(types).to(self.device, non_blocking=True)
        logits = self.model(**inputs, return_dict=True).logits
        return logits.view(-1).float().cpu().numpy()

"""The padded runner: load a Hugging Face cross-encoder and run its own forward (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rerank_ray.storage import ModelLoadError


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

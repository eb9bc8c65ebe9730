"""Read a plain XLM-R/RoBERTa/BERT reranker checkpoint without transformers: config.json and
safetensors tensors by their state-dict names (the packed encoder's fast start on a GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

# Model types with RoBERTa's position ids (offset by the padding index) and layout.
ROBERTA_LIKE = ("xlm-roberta", "roberta")


# Checkpoint layouts from_checkpoint reads: the architecture's class name -> its model_type.
_ARCHITECTURES = {
    "XLMRobertaForSequenceClassification": "xlm-roberta",
    "RobertaForSequenceClassification": "roberta",
    "BertForSequenceClassification": "bert",
}
# Settings the encoder reads; from_checkpoint wants each written out in config.json.
_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_hidden_layers",
    "hidden_act",
    "layer_norm_eps",
    "max_position_embeddings",
)


def checkpoint_config(model_dir: Path) -> SimpleNamespace | None:
    """``config.json`` as attributes, or None unless it plainly describes a model this module
    reads without transformers (see ``PackedEncoder.from_checkpoint``)."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("auto_map"):  # remote code: transformers decides
        return None
    archs = raw.get("architectures") or []
    if len(archs) != 1 or _ARCHITECTURES.get(archs[0]) != raw.get("model_type"):
        return None
    if any(key not in raw for key in _CONFIG_KEYS):
        return None
    if raw["model_type"] in ROBERTA_LIKE and not isinstance(raw.get("pad_token_id"), int):
        return None
    if isinstance(raw.get("id2label"), dict):  # how transformers counts labels
        num_labels = len(raw["id2label"])
    elif isinstance(raw.get("num_labels"), int):
        num_labels = raw["num_labels"]
    else:
        return None
    return SimpleNamespace(**{**raw, "num_labels": num_labels})


def checkpoint_tensors(model_dir: Path, device: str | torch.device):
    """``name -> tensor`` over the directory's safetensors weights (one file, or shards with
    an index), each tensor read straight onto ``device``; None without safetensors."""
    from safetensors import safe_open

    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        file_of = None
    elif index.is_file():
        try:
            file_of = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError):
            return None
    else:
        return None
    handles: dict[str, tuple] = {}

    def tensor(name: str) -> torch.Tensor:
        file = single.name if file_of is None else file_of[name]  # KeyError: not there
        if file not in handles:
            handle = safe_open(str(model_dir / file), framework="pt", device=str(device))
            handles[file] = (handle, set(handle.keys()))
        handle, names = handles[file]
        if name not in names:
            raise KeyError(name)
        return handle.get_tensor(name)

    return tensor

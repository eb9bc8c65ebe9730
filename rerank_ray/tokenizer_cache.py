"""The tokenize stage's per-node cache: what it takes from a Hugging Face tokenizer, so later
actors start without importing transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf", ".tflite",
)  # fmt: skip
_KEY_FILE_MAX_BYTES = 256 << 20  # larger files are weights or data, never a tokenizer's


class TokenizerCache:
    """One JSON file per key: the model directory's non-weight files (names and bytes: the
    tokenizer files, its config; files over 256 MiB are left out), the transformers and
    tokenizers versions, and this format's version. Written atomically; an unreadable or
    foreign file is a miss."""

    FORMAT = 1

    def __init__(self, model_dir: str, cache_dir: str) -> None:
        from importlib import metadata

        def version(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "absent"

        h = hashlib.sha256()
        versions = [version(p) for p in ("transformers", "tokenizers")]
        h.update(f"rerank-ray tokenizer cache {self.FORMAT} {versions}".encode())
        for path in sorted(Path(model_dir).iterdir()):
            if (
                path.is_file()
                and not path.name.endswith(_WEIGHT_SUFFIXES)
                and path.stat().st_size <= _KEY_FILE_MAX_BYTES
            ):
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        self.key = h.hexdigest()
        self.path = Path(cache_dir) / "tokenizers" / f"{self.key}.json"

    def load(self) -> dict | None:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        return saved

    def save(self, content: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": self.key, **content}))
            os.replace(tmp, self.path)  # readers see the old file or the whole new one
        except OSError as e:  # a read-only cache only costs start-up time
            logger.info("Tokenizer cache not written to %s: %s", self.path, e)


def raw_rust_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer, else None. A private copy, so
    changing its truncation settings leaves the HF tokenizer as it was."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    raw = Tokenizer.from_str(backend.to_str())
    raw.no_padding()  # a tokenizer.json may carry a padding setting; the HF call turns it off
    return raw

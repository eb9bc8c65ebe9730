"""INT8 scoring on CPU: the cross-encoder exported to ONNX once per node, quantized by
``int8_recipe``, and run by an ONNX Runtime session with the actor's CPUs as its threads.

The export and quantization run once per model and node, the first time an actor needs them,
into ``<cache>/int8-cpu/<key>/model.onnx``; later actors load the cached file. The key covers
the model's config and weight files (names, sizes, times), the torch and ONNX Runtime versions
and the quantization recipe, so a changed model gets a fresh export. ``onnxruntime`` and
``onnx`` come with the optional ``[cpu]`` extra only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rerank_ray.runners.int8_recipe import RECIPE, calibration_feeds, quantize_onnx
from rerank_ray.runners.padded import pad_packed
from rerank_ray.storage import ModelLoadError, default_cache_dir

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_INSTALL_HINT = "install the CPU extra: pip install 'rerank-ray[cpu]'"


def actor_threads() -> int:
    """Intra-op threads for one scoring actor: the CPUs Ray gave it.

    Ray sets ``OMP_NUM_THREADS`` in each actor to the actor's ``num_cpus`` (when the user has
    not set it); outside Ray, the CPUs this process may run on (``os.sched_getaffinity``).
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Int8CpuRunner:
    """Scores packed micro-batches with an int8 ONNX Runtime session (padded to the longest
    row, as the exported HF graph takes them): ``score(ids_flat, offsets, type_ids_flat)``."""

    padded = True  # the scorer cuts micro-batches as rows x longest row

    def __init__(self, session, *, pad_id: int, onnx_path: Path, threads: int) -> None:
        """``session``: an ``onnxruntime.InferenceSession`` of an exported cross-encoder
        taking ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, [rows, len])
        and returning logits [rows, 1]. Built by ``from_model_dir``."""
        self.session = session
        self.pad_id = int(pad_id)
        self.onnx_path = onnx_path
        self.threads = threads
        self._inputs = {i.name for i in session.get_inputs()}

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        allow_pickle_weights: bool = False,
        trust_remote_code: bool = False,
        cache_dir: str | Path | None = None,
    ) -> Int8CpuRunner:
        """Export and quantize the model in ``model_dir`` (once per node, cached), then open
        an ONNX Runtime session with ``threads`` intra-op threads (default ``actor_threads()``).
        ``cache_dir`` defaults to rerank-ray's cache (``RERANK_RAY_CACHE``)."""
        ort = _import_onnxruntime()
        threads = actor_threads() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads is {threads}; pass at least 1 (the actor's num_cpus).")
        path, pad_id = quantized_model(
            Path(model_dir),
            allow_pickle_weights=allow_pickle_weights,
            trust_remote_code=trust_remote_code,
            cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph runs at a time: no second pool to spin
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, pad_id=pad_id, onnx_path=path, threads=threads)

    def score(
        self, ids_flat: np.ndarray, offsets: np.ndarray, type_ids_flat: np.ndarray | None
    ) -> np.ndarray:
        """Raw logits (float32), one per sequence of the packed micro-batch, in its order."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0:
            raise ValueError("offsets must be 1-D Arrow list offsets starting at 0, length B+1.")
        if int(offsets[-1]) != len(ids_flat):
            raise ValueError(f"offsets end at {offsets[-1]} but ids_flat has {len(ids_flat)}.")
        ids, mask = pad_packed(np.asarray(ids_flat, dtype=np.int64), offsets, self.pad_id)
        feed = {"input_ids": ids, "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self._inputs:
            if type_ids_flat is None:  # HF's default: every token of segment 0
                feed["token_type_ids"] = np.zeros_like(ids)
            else:
                types = np.asarray(type_ids_flat, dtype=np.int64)
                feed["token_type_ids"] = pad_packed(types, offsets, 0)[0]
        (logits,) = self.session.run(["logits"], feed)
        return logits.reshape(-1).astype(np.float32, copy=False)


def quantized_model(
    model_dir: Path,
    *,
    allow_pickle_weights: bool,
    trust_remote_code: bool,
    cache_dir: Path,
) -> tuple[Path, int]:
    """The int8 ONNX file of ``model_dir`` and its pad token id, exported and quantized on
    the first call and read from ``cache_dir`` after that."""
    target = cache_dir / "int8-cpu" / cache_key(model_dir)
    meta_path = target / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return target / "model.onnx", int(meta["pad_id"])
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built in a private directory, then renamed into place: actors starting together on a
    # node each build, the first rename wins and the others drop theirs.
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        pad_id = _export_and_quantize(model_dir, work, allow_pickle_weights, trust_remote_code)
        (work / "meta.json").write_text(json.dumps({"pad_id": pad_id, "source": str(model_dir)}))
        try:
            work.rename(target)
        except OSError:
            if not meta_path.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "model.onnx", pad_id


def cache_key(model_dir: Path) -> str:
    """What the int8 file depends on: the model's config and weight files, torch and ONNX
    Runtime versions, the recipe. Names, sizes and modification times stand for the weights'
    contents (hashing gigabytes at every actor start would cost seconds)."""
    import onnxruntime

    digest = hashlib.sha256()
    for part in (RECIPE, torch.__version__, onnxruntime.__version__, str(model_dir.resolve())):
        digest.update(part.encode() + b"\0")
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.name == "config.json" or _is_weight_file(path.name)):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    config = model_dir / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    return digest.hexdigest()[:24]


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name.endswith(".index.json")


def _export_and_quantize(
    model_dir: Path, out: Path, allow_pickle_weights: bool, trust_remote_code: bool
) -> int:
    """fp32 HF model -> ``out/fp32/model.onnx`` -> ``out/model.onnx`` with int8 weights; the
    fp32 export is removed. Returns the pad token id."""
    from rerank_ray.runners.padded import load_cross_encoder

    model = load_cross_encoder(
        model_dir,
        device=torch.device("cpu"),
        dtype=torch.float32,
        allow_pickle_weights=allow_pickle_weights,
        trust_remote_code=trust_remote_code,
    )
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Its own folder: a model over 2 GB is exported with its weights in side files.
    fp32_dir = out / "fp32"
    fp32_dir.mkdir()
    export_onnx(model, fp32_dir / "model.onnx")
    del model
    feeds = calibration_feeds(model_dir, pad_id)
    quantize_onnx(fp32_dir / "model.onnx", out / "model.onnx", feeds)
    shutil.rmtree(fp32_dir)
    return int(pad_id)


def export_onnx(model: torch.nn.Module, path: Path) -> None:
    """A loaded fp32 HF sequence-classification model -> an fp32 ONNX graph at ``path``:
    inputs ``INPUT_NAMES`` (int64, [rows, tokens], both dynamic), output ``logits``."""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Two rows, the second padded, so the exporter traces the attention mask's padded path.
    ids = torch.arange(16).view(2, 8) % (model.config.vocab_size - 3) + 3
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = pad_id
    dynamic = {name: {0: "rows", 1: "tokens"} for name in INPUT_NAMES}
    with torch.inference_mode():
        torch.onnx.export(
            _LogitsOnly(model).eval(),  # a new Module trains; export would leave the model so
            (ids, mask, torch.zeros_like(ids)),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            dynamic_axes={**dynamic, "logits": {0: "rows"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency
        )


class _LogitsOnly(torch.nn.Module):
    """The HF model with positional inputs and the logits tensor as its only output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def _import_onnxruntime():
    try:
        import onnx  # noqa: F401  (the quantizer reads and writes ONNX files with it)
        import onnxruntime
    except ImportError as exc:
        raise ModelLoadError(
            f"precision 'int8' runs on ONNX Runtime, which is not installed ({exc}): "
            f"{_INSTALL_HINT}, or score with precision 'fp32'."
        ) from None
    return onnxruntime

"""The INT8 recipe for CPU scoring: an fp32 ONNX graph -> int8 Linear layers with activations
quantized per token, SmoothQuant scales, and the calibration pairs they are measured on.

Why (measured: bench/README.md "INT8 on CPU"): with one activation scale per tensor, a few
tokens and channels with large activations set the scale and the rest round coarsely. The
recipe keeps ONNX Runtime's int8 GEMM (``MatMulIntegerToFloat``, u8 x s8, one weight scale per
output channel) and changes what feeds it:

- one activation scale per token (row) instead of per tensor, computed at run time;
- SmoothQuant scales on the inputs that come from a LayerNorm or from attention: each input
  channel divided by ``s_j = max|x_j|^a / max|W_j|^(1-a)`` and the weight's row multiplied
  by it, so outlier channels move into the weights (``s`` from a calibration pass, below);
- the feed-forward down-projection's input (GELU output, never below -0.17) shifted by +0.17,
  so it is quantized on [0, 255] with all 8 bits; the shift is taken back out of the bias
  exactly (``(x + c) W = x W + c * colsum(W)``).

A score does not move with the other pairs' activations (only, slightly, with the padded
width of its micro-batch). Embedding tables are int8 too (ONNX Runtime's Gather quantization).

Calibration: each channel's largest activation (systematic in a model, more than in data), on
``CALIBRATION_PAIRS`` English pairs from one half of the Python reference manual
(``manual_words(0)``), never on the pairs being scored; bench/cpu_bench.py scores the other.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from rerank_ray.storage import ModelLoadError

# Bumped whenever the export or quantization settings below change (part of the cache key).
RECIPE = "onnx-opset17-rowwise-u8s8-smooth0.6-gelushift-v2"
# SmoothQuant's migration strength: 0.6 ranked closest to fp32 of 0.3-1.0 on the bench's
# selection split (bench/README.md, "INT8 on CPU").
SMOOTH_ALPHA = 0.6
# Exact GELU's minimum is -0.16997: its output plus this is never negative.
GELU_SHIFT = 0.17
CALIBRATION_PAIRS = 96
CALIBRATION_SEED = 20261130


def manual_words(half: int) -> list[str]:
    """The words of one half (0 or 1) of the Python reference manual shipped with the
    interpreter (``pydoc_data.topics``): its distinct paragraphs, each in the half given by
    the parity of its CRC-32, so a paragraph the manual repeats under several topics lands in
    one half only. Half 0 calibrates the int8 export; bench/cpu_bench.py scores half 1."""
    from pydoc_data.topics import topics

    paragraphs = dict.fromkeys(
        para.strip() for name in sorted(topics) for para in topics[name].split("\n\n")
    )
    text = " ".join(p for p in paragraphs if p and zlib.crc32(p.encode()) % 2 == half)
    return re.sub(r"[^A-Za-z0-9.,;:()'\"-]+", " ", text).split()


def calibration_pairs(n: int = CALIBRATION_PAIRS, seed: int = CALIBRATION_SEED):
    """``n`` English (query, document) pairs for the SmoothQuant calibration pass: windows of
    ``manual_words(0)`` (the bench scores half 1), documents of about 6-540 words, each query
    cut from its document."""
    words = manual_words(0)
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        length = int(np.clip(np.exp(rng.normal(4.49, 0.55)), 8, 700) / 1.3)
        start = int(rng.integers(0, len(words) - length))
        at = start + int(rng.integers(0, max(1, length - 20)))
        query = " ".join(words[at : at + int(rng.integers(6, 21))])
        pairs.append((query, " ".join(words[start : start + length])))
    return pairs


def calibration_feeds(model_dir: Path, pad_id: int, rows: int = 16) -> list[dict]:
    """``calibration_pairs`` tokenized by the model's tokenizer (512 tokens at most), as
    padded, length-sorted ONNX Runtime feeds of ``rows`` pairs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = calibration_pairs()
    enc = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True, max_length=512)
    seqs = enc["input_ids"]
    types = enc.get("token_type_ids") or [[0] * len(x) for x in seqs]
    order = np.argsort([len(x) for x in seqs], kind="stable")
    feeds = []
    for start in range(0, len(order), rows):
        chunk = order[start : start + rows]
        width = max(len(seqs[i]) for i in chunk)
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        type_ids = np.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, : len(seqs[i])] = seqs[i]
            mask[row, : len(seqs[i])] = 1
            type_ids[row, : len(seqs[i])] = types[i]
        feeds.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids})
    return feeds


def quantize_onnx(src: Path, dst: Path, calibration: list[dict]) -> None:
    """The fp32 graph at ``src`` -> ``dst``: every MatMul with a constant 2-D weight becomes
    row-wise int8 (``rowwise_int8``), then the embedding tables (Gather) are quantized by ONNX
    Runtime, one scale per row of the table. ``calibration``: feeds for the SmoothQuant pass."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = rowwise_int8(onnx.load(str(src)), calibration)
    rowwise = dst.parent / "rowwise" / "model.onnx"
    rowwise.parent.mkdir()
    _save(model, rowwise)
    del model
    quantize_dynamic(
        str(rowwise),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["Gather"],
        extra_options={"DefaultTensorType": 1},  # float, where shape inference cannot tell
    )
    shutil.rmtree(rowwise.parent)


def rowwise_int8(model, calibration: list[dict], alpha: float = SMOOTH_ALPHA):
    """``model`` (an fp32 ``onnx.ModelProto``) with each MatMul against a constant [K, N]
    weight replaced by: (shift +0.17 if its input is a GELU's output, else divide by the
    SmoothQuant scales) -> one u8 scale per row -> ``MatMulIntegerToFloat`` with s8 weights,
    one scale per output column -> times the row scales. MatMuls sharing an input (query, key,
    value) share its quantization. Activation-by-activation MatMuls (attention) stay fp32."""
    from onnx import numpy_helper
    from onnx.helper import make_opsetid

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    groups: dict[str, list] = defaultdict(list)
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups[node.input[0]].append(node)
    shifted = {x for x in groups if _is_gelu_output(x, producers)}
    amax = channel_absmax(model, [x for x in groups if x not in shifted], calibration)
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    added = _Added()
    added.const("rowq_one", np.array(1.0, np.float32))
    added.const("rowq_tiny", np.array(1e-30, np.float32))
    added.const("rowq_last", np.array([-1], np.int64))
    added.const("rowq_zp0", np.array(0, np.uint8))
    added.const("rowq_zp128", np.array(128, np.uint8))
    added.const("rowq_zp128_1d", np.array([128], np.uint8))
    replaced: dict[str, list] = {}
    for g, (x, nodes) in enumerate(groups.items()):
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        if x in shifted:
            smooth = np.ones(weights[0].shape[0], np.float32)
            for node, weight in zip(nodes, weights, strict=True):
                _shift_bias(node, weight, inits, producers, consumers, added)
        else:
            wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            smooth = np.maximum(amax[x], 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)
            smooth = smooth.astype(np.float32)
        head = _row_quantize(added, f"rowq{g}_", x, len(smooth), x in shifted, smooth)
        for j, (node, weight) in enumerate(zip(nodes, weights, strict=True)):
            tail = _int8_matmul(
                added,
                f"rowq{g}_{j}_",
                f"rowq{g}_",
                node.output[0],
                weight * smooth[:, None],
                x in shifted,
            )
            replaced[node.name] = (head if j == 0 else []) + tail
    kept = [n for node in graph.node for n in replaced.get(node.name, [node])]
    del graph.node[:]
    graph.node.extend(kept)
    dropped = {n.input[1] for nodes in groups.values() for n in nodes}
    kept_inits = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + added.initializers)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(make_opsetid("com.microsoft", 1))
    return model


def channel_absmax(model, names: list[str], calibration: list[dict]) -> dict[str, np.ndarray]:
    """Each named fp32 tensor's largest |value| per channel (last axis) over the real tokens
    of the ``calibration`` feeds, run through ``model`` by ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        _save(probe, path)
        del probe
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out: dict[str, np.ndarray] = {}
        for feed in calibration:
            real = feed["attention_mask"].reshape(-1).astype(bool)
            for name, value in zip(names, session.run(names, feed), strict=True):
                value = np.abs(value.reshape(-1, value.shape[-1])[real]).max(axis=0)
                out[name] = np.maximum(out[name], value) if name in out else value
    return out


class _Added:
    """Initializers the rewrite adds, by name."""

    def __init__(self) -> None:
        self.initializers: list = []

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(value, name))
        return name


def _row_quantize(added: _Added, p: str, x: str, k: int, shifted: bool, smooth: np.ndarray):
    """Nodes: ``x`` [..., K] -> ``{p}q`` u8 and ``{p}rs`` f32 [..., 1] with
    ``x / smooth (or x + 0.17) ~= ({p}q - zero point) * {p}rs`` row by row. Symmetric around
    128 (7 bits a side) unless shifted (8 bits, >= 0). QuantizeLinear takes one scale per
    row only on a 2-D view ([rows, K], axis 0); ``{p}q`` is reshaped back to x's shape so the
    graph keeps its ranks (ONNX Runtime's bias + residual + LayerNorm fusion needs them)."""
    from onnx.helper import make_node as node

    nodes = []
    if shifted:
        nodes.append(
            node("Add", [x, added.const(p + "shift", np.array(GELU_SHIFT, np.float32))], [p + "xs"])
        )
        nodes.append(node("ReduceMax", [p + "xs"], [p + "amax"], axes=[-1], keepdims=1))
    else:
        nodes.append(
            node("Mul", [x, added.const(p + "inv_s", (1 / smooth).astype(np.float32))], [p + "xs"])
        )
        nodes += [
            node("ReduceMax", [p + "xs"], [p + "hi"], axes=[-1], keepdims=1),
            node("ReduceMin", [p + "xs"], [p + "lo"], axes=[-1], keepdims=1),
            node("Neg", [p + "lo"], [p + "neg_lo"]),
            node("Max", [p + "hi", p + "neg_lo"], [p + "amax"]),
        ]
    levels = added.const(p + "inv_levels", np.array(1 / (255 if shifted else 127), np.float32))
    nodes += [
        node("Mul", [p + "amax", levels], [p + "rs0"]),
        node("Max", [p + "rs0", "rowq_tiny"], [p + "rs"]),  # [..., 1]
        node("Reshape", [p + "rs", "rowq_last"], [p + "rs1"]),  # [rows]
        node(
            "Reshape",
            [p + "xs", added.const(p + "rows_k", np.array([-1, k], np.int64))],
            [p + "x2"],
        ),
        node("Shape", [x], [p + "shape"]),
    ]
    quantize_inputs = [p + "x2", p + "rs1"]
    if not shifted:  # a zero point per row, all 128 (QuantizeLinear wants one per scale)
        nodes += [
            node("Shape", [p + "rs1"], [p + "rows"]),
            node("Expand", ["rowq_zp128_1d", p + "rows"], [p + "zp"]),
        ]
        quantize_inputs.append(p + "zp")
    nodes.append(node("QuantizeLinear", quantize_inputs, [p + "q2"], axis=0))
    nodes.append(node("Reshape", [p + "q2", p + "shape"], [p + "q"]))
    return nodes


def _int8_matmul(added: _Added, p: str, rows_p: str, out: str, weight: np.ndarray, shifted: bool):
    """Nodes: ``{rows_p}q`` (u8) x ``weight`` (s8, one scale per column) x ``{rows_p}rs`` (one
    scale per row) -> ``out``."""
    from onnx.helper import make_node as node

    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127
    quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    zero_point = "rowq_zp0" if shifted else "rowq_zp128"
    inputs = [
        rows_p + "q",
        added.const(p + "w", quantized),
        "rowq_one",
        added.const(p + "ws", scale.astype(np.float32)),
        zero_point,
    ]
    return [
        node("MatMulIntegerToFloat", inputs, [p + "int"], domain="com.microsoft"),
        node("Mul", [p + "int", rows_p + "rs"], [out]),
    ]


def _shift_bias(node, weight: np.ndarray, inits: dict, producers: dict, consumers: dict,
                added: _Added) -> None:  # fmt: skip
    """(x + c) W + b' = x W + b when b' = b - c * colsum(W): the exporter's bias Add right
    after ``node`` gets b' as a new constant (its b may be shared with other layers, through
    an Identity, when their values are equal)."""
    from onnx import numpy_helper

    adds = [c for c in consumers[node.output[0]] if c.op_type == "Add"]
    if len(adds) == 1:
        add = adds[0]
        slot = 1 - list(add.input).index(node.output[0])
        name = add.input[slot]
        source = producers.get(name)
        if source is not None and source.op_type == "Identity":
            name = source.input[0]
        if name in inits:
            bias = numpy_helper.to_array(inits[name]) - GELU_SHIFT * weight.sum(axis=0)
            add.input[slot] = added.const(node.name + "/shifted_bias", bias.astype(np.float32))
            return
    raise ModelLoadError(
        f"int8 export: {node.name} is not followed by one Add of a constant bias, so its "
        "shifted input cannot be corrected; score this model with precision 'fp32'."
    )


def _is_gelu_output(name: str, producers: dict) -> bool:
    """Whether ``name`` is computed by an exact GELU as the exporter writes it
    (x * 0.5 * (1 + erf(x / sqrt 2))): an Erf within the elementwise ops that produce it."""
    stack = [producers[name]] if name in producers else []
    for _ in range(8):
        if not stack:
            return False
        node = stack.pop()
        if node.op_type == "Erf":
            return True
        if node.op_type in ("Mul", "Add", "Div"):
            stack += [producers[i] for i in node.input if i in producers]
    return False


def _save(model, path: Path) -> None:
    """Save ``model``, its weights in a side file when the protobuf would pass 2 GB (a
    protobuf over 2 GB cannot even report its size: ``ByteSize`` raises)."""
    import onnx
    from google.protobuf.message import EncodeError

    try:
        big = model.ByteSize() > 1_800_000_000
    except EncodeError:
        big = True
    onnx.save(model, str(path), save_as_external_data=big, location=path.name + ".data")

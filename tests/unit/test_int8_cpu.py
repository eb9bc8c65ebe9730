"""Int8CpuRunner: the runner contract, the exported graph, and int8 scores against fp32.

The exported graph is checked exactly: the same session wrapper over the fp32 export gives
HF's fp32 logits. The int8 error is bounded here, and the row-wise recipe is checked against
ONNX Runtime's stock per-tensor dynamic int8 of the same export; the tiny models' random
weights put their scores within a few hundredths of each other, closer than int8 rounding
moves them, so per-query rank figures come from the trained model in bench/cpu_bench.py.
The rewrite itself (row scales, SmoothQuant, the GELU shift taken out of the bias) is checked
on a one-layer graph with known weights. ONNX Runtime (the ``[cpu]`` extra) is in the test
extras: never skipped.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rerank_ray.runners.int8_cpu import Int8CpuRunner, actor_threads, export_onnx
from rerank_ray.runners.int8_recipe import GELU_SHIFT, calibration_pairs, manual_words, rowwise_int8
from rerank_ray.runners.padded import PaddedRunner, load_cross_encoder
from rerank_ray.tiny_model import SAMPLE_TEXTS


def packed_pairs(model_dir, n: int, seed: int = 0):
    """``n`` tokenized (query, doc) pairs of varied lengths: flat ids, offsets, flat types."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = np.random.default_rng(seed)
    queries = [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(n)]
    docs = [" ".join(rng.choice(SAMPLE_TEXTS, size=rng.integers(1, 8))) for _ in range(n)]
    enc = tok(queries, docs, truncation=True, max_length=128)
    rows = enc["input_ids"]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    ids = np.concatenate(rows).astype(np.int64)
    types = (
        np.concatenate(enc["token_type_ids"]).astype(np.int64) if "token_type_ids" in enc else None
    )
    return ids, offsets, types


def fp32_scores(model_dir, ids, offsets, types):
    model = load_cross_encoder(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    return PaddedRunner(model, torch.device("cpu")).score(ids, offsets, types)


@pytest.fixture(scope="module")
def runners(tiny_model_dir, tiny_bert_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("int8-cache")
    return {
        "xlmr": Int8CpuRunner.from_model_dir(tiny_model_dir, threads=1, cache_dir=cache),
        "bert": Int8CpuRunner.from_model_dir(tiny_bert_dir, threads=1, cache_dir=cache),
    }


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_fp32_export_fed_by_the_runner_equals_hf(kind, tiny_model_dir, tiny_bert_dir, tmp_path):
    """The graph and the runner's feeding (padding, mask, token types, order) are exact: the
    runner over the fp32 export gives HF's padded fp32 logits."""
    import onnxruntime as ort

    model_dir = tiny_model_dir if kind == "xlmr" else tiny_bert_dir
    model = load_cross_encoder(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    export_onnx(model, tmp_path / "fp32.onnx")
    session = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"])
    runner = Int8CpuRunner(
        session, pad_id=model.config.pad_token_id, onnx_path=tmp_path / "fp32.onnx", threads=1
    )
    ids, offsets, types = packed_pairs(model_dir, 40)
    hf = PaddedRunner(model, torch.device("cpu"))
    ref = hf.score(ids, offsets, types)
    np.testing.assert_allclose(runner.score(ids, offsets, types), ref, rtol=0, atol=1e-4)
    if types is not None:  # BERT: the types reach the graph; without them, segment 0 (HF's)
        assert types.any()
        zeros = hf.score(ids, offsets, np.zeros_like(types))
        assert np.abs(zeros - ref).max() > 1e-3
        np.testing.assert_allclose(runner.score(ids, offsets, None), zeros, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_int8_error_is_bounded(kind, runners, tiny_model_dir, tiny_bert_dir):
    model_dir = tiny_model_dir if kind == "xlmr" else tiny_bert_dir
    ids, offsets, types = packed_pairs(model_dir, 64)
    ref = fp32_scores(model_dir, ids, offsets, types)
    got = runners[kind].score(ids, offsets, types)
    assert got.dtype == np.float32 and got.shape == (64,)
    # int8 rounding moves a logit by up to ~15% of its size on these random weights (a wrong
    # graph or input moves it by far more; the fp32 export is checked exactly above).
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()
    assert np.abs(got - ref).mean() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["xlmr", "bert"])
def test_rowwise_is_closer_to_fp32_than_per_tensor(kind, runners, tiny_model_dir, tiny_bert_dir,
                                                   tmp_path):  # fmt: skip
    """The shipped recipe against ONNX Runtime's stock dynamic int8 (one activation scale
    per tensor) of the same export, on the same pairs: smaller mean error vs fp32."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_dir = tiny_model_dir if kind == "xlmr" else tiny_bert_dir
    model = load_cross_encoder(model_dir, device=torch.device("cpu"), dtype=torch.float32)
    export_onnx(model, tmp_path / "fp32.onnx")
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "pt.onnx"),
                     weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
    session = ort.InferenceSession(str(tmp_path / "pt.onnx"), providers=["CPUExecutionProvider"])
    per_tensor = Int8CpuRunner(
        session, pad_id=model.config.pad_token_id, onnx_path=tmp_path / "pt.onnx", threads=1
    )
    ids, offsets, types = packed_pairs(model_dir, 64, seed=5)
    ref = fp32_scores(model_dir, ids, offsets, types)
    ours = np.abs(runners[kind].score(ids, offsets, types) - ref).mean()
    stock = np.abs(per_tensor.score(ids, offsets, types) - ref).mean()
    assert ours < stock


def test_rowwise_rewrite_of_one_linear_gelu_linear(tmp_path):
    """x -> Linear -> GELU -> Linear, as the exporter writes it: the rewrite shifts the GELU
    output (and takes the shift out of the second bias), smooths the first input, and stays
    within int8 rounding of fp32 even with an outlier channel 50x the others."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(0, 0.1, (32, 64)).astype(np.float32), rng.normal(0, 0.1, 64)
    w2, b2 = rng.normal(0, 0.1, (64, 16)).astype(np.float32), rng.normal(0, 0.1, 16)
    consts = {"w1": w1, "b1": b1.astype(np.float32), "w2": w2, "b2": b2.astype(np.float32),
              "sqrt2": np.float32(np.sqrt(2)), "one": np.float32(1), "half": np.float32(0.5)}  # fmt: skip
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["m1"], name="up"),
        node("Add", ["b1", "m1"], ["h"]),
        node("Div", ["h", "sqrt2"], ["hd"]),
        node("Erf", ["hd"], ["e"]),
        node("Add", ["e", "one"], ["e1"]),
        node("Mul", ["h", "e1"], ["he"]),
        node("Mul", ["he", "half"], ["g"]),
        node("MatMul", ["g", "w2"], ["m2"], name="down"),
        node("Add", ["b2", "m2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "tokens", 32]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["rows", "tokens"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "tokens", 16])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(0, 1, (3, 7, 32)).astype(np.float32)
    x[..., 5] *= 50  # an outlier channel, as LayerNorm outputs of trained models have
    mask = np.ones((3, 7), dtype=np.int64)
    feeds = [{"x": rng.normal(0, 1, (3, 7, 32)).astype(np.float32) * np.where(
        np.arange(32) == 5, 50, 1).astype(np.float32), "attention_mask": mask} for _ in range(4)]  # fmt: skip
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = fp32.run(["y"], {"x": x, "attention_mask": mask})[0]
    quantized = rowwise_int8(model, feeds)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    shifted = inits["down/shifted_bias"]  # the second bias, less the shift times colsum(W)
    np.testing.assert_allclose(shifted, b2 - GELU_SHIFT * w2.sum(axis=0), rtol=1e-6, atol=1e-6)
    onnx.checker.check_model(quantized)
    session = ort.InferenceSession(
        quantized.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(["y"], {"x": x, "attention_mask": mask})[0]
    assert got.shape == ref.shape
    # int8 on both layers: about 1% of the output's scale, far below a wrong shift or scale
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def test_calibration_pairs_are_fixed_and_share_no_text_with_the_bench_half():
    pairs = calibration_pairs(40)
    assert pairs == calibration_pairs(40) and len(pairs) == 40
    calibration, bench = " ".join(manual_words(0)), " ".join(manual_words(1))
    assert len(calibration) > 100_000 and len(bench) > 100_000
    runs = []
    for query, doc in pairs:
        assert query in doc and len(doc.split()) >= 6
        assert doc in calibration and doc not in bench
        words = doc.split()
        runs += [" ".join(words[i : i + 12]) for i in range(0, max(1, len(words) - 11), 6)]
    # The manual repeats a few sentences in different paragraphs (str.ljust's and center's
    # docs, say): about 1% of 12-word runs; a window of the bench's half, never.
    assert sum(run in bench for run in runs) < 0.03 * len(runs)


def test_runner_contract(runners):
    runner = runners["xlmr"]
    assert runner.padded is True  # the scorer cuts its micro-batches as rows x longest
    assert runner.threads == 1


def test_scores_follow_row_order(runners, tiny_model_dir):
    """One score per sequence, in the order given: a permuted batch gives permuted scores."""
    ids, offsets, types = packed_pairs(tiny_model_dir, 12, seed=3)
    runner = runners["xlmr"]
    base = runner.score(ids, offsets, types)
    perm = np.random.default_rng(1).permutation(12)
    rows = [ids[offsets[i] : offsets[i + 1]] for i in perm]
    p_offsets = np.zeros(13, dtype=np.int64)
    p_offsets[1:] = np.cumsum([len(r) for r in rows])
    permuted = runner.score(np.concatenate(rows), p_offsets, None)
    np.testing.assert_allclose(permuted, base[perm], rtol=0, atol=1e-5)


def test_a_row_is_quantized_on_its_own(runners, tiny_model_dir):
    """Activation scales are per token: a pair scored alone (no padding, no neighbours)
    scores as in a padded micro-batch, up to fp32 rounding in the unquantized parts (which
    can move a value across an int8 rounding step). The per-tensor recipe did not: there,
    every row shared the micro-batch's one scale."""
    ids, offsets, types = packed_pairs(tiny_model_dir, 12, seed=3)
    runner = runners["xlmr"]
    base = runner.score(ids, offsets, types)
    alone = np.array(
        [runner.score(ids[offsets[i] : offsets[i + 1]], offsets[i : i + 2] - offsets[i], None)[0]
         for i in range(12)]
    )  # fmt: skip
    assert np.abs(alone - base).max() < 0.01 * np.abs(base).max()


def test_export_is_cached_per_model(tiny_model_dir, tmp_path):
    first = Int8CpuRunner.from_model_dir(tiny_model_dir, threads=1, cache_dir=tmp_path)
    stamp = first.onnx_path.stat().st_mtime_ns
    second = Int8CpuRunner.from_model_dir(tiny_model_dir, threads=1, cache_dir=tmp_path)
    assert second.onnx_path == first.onnx_path
    assert second.onnx_path.stat().st_mtime_ns == stamp  # read, not rebuilt
    assert [p.name for p in (tmp_path / "int8-cpu").iterdir()] == [first.onnx_path.parent.name]


def test_bad_input_is_refused(runners):
    runner = runners["xlmr"]
    with pytest.raises(ValueError, match="offsets end at 5"):
        runner.score(np.arange(4, dtype=np.int64), np.array([0, 5]), None)
    with pytest.raises(ValueError, match="starting at 0"):
        runner.score(np.arange(4, dtype=np.int64), np.array([1, 4]), None)


def test_threads(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # what Ray sets in an actor with num_cpus=3
    assert actor_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert actor_threads() >= 1
    with pytest.raises(ValueError, match="threads is 0"):
        Int8CpuRunner.from_model_dir(tiny_model_dir, threads=0, cache_dir=tmp_path)


def test_many_batch_shapes_one_session(runners, tiny_model_dir):
    """Batch and length are dynamic in the exported graph: any (rows, longest) runs."""
    ids, offsets, _ = packed_pairs(tiny_model_dir, 8, seed=7)
    runner = runners["xlmr"]
    for start, end in itertools.combinations([0, 1, 3, 8], 2):
        lo, hi = offsets[start], offsets[end]
        out = runner.score(ids[lo:hi], offsets[start : end + 1] - lo, None)
        assert out.shape == (end - start,) and np.isfinite(out).all()


def test_the_factory_builds_the_int8_runner_only_when_asked(tiny_model_dir):
    from rerank_ray.config import ConfigError
    from rerank_ray.runners import RunnerOptions, build_runner

    built = build_runner(tiny_model_dir, RunnerOptions(device="cpu", precision="int8"))
    assert isinstance(built.runner, Int8CpuRunner) and built.load_path == "onnx-int8"
    assert isinstance(
        build_runner(tiny_model_dir, RunnerOptions(device="cpu")).runner, PaddedRunner
    )
    with pytest.raises(ConfigError, match="int8 runs on CPU"):
        RunnerOptions(precision="int8", dtype="float16")


def test_the_score_stage_scores_with_int8_when_asked(tiny_model_dir):
    import pyarrow as pa

    from rerank_ray import schema
    from rerank_ray.runners import RunnerOptions
    from rerank_ray.scorer import ScoreStage
    from rerank_ray.tokenize import TokenizeStage

    texts = SAMPLE_TEXTS
    batch = pa.table(
        {
            "query_id": [f"q{i % 3}" for i in range(12)],
            "query": [texts[i % 3] for i in range(12)],
            "doc_id": [f"d{i}" for i in range(12)],
            "doc": [
                " ".join(texts[(i + j) % len(texts)] for j in range(1 + i % 4)) for i in range(12)
            ],
        }
    )
    tokens = TokenizeStage(str(tiny_model_dir), 512, 384)(batch)
    fp32 = ScoreStage(str(tiny_model_dir), RunnerOptions(device="cpu"))(tokens)
    int8 = ScoreStage(str(tiny_model_dir), RunnerOptions(device="cpu", precision="int8"))(tokens)
    ref, got = fp32[schema.SCORE].to_numpy(), int8[schema.SCORE].to_numpy()
    assert int8.num_rows == 12 and not np.isnan(got).any()
    assert not np.array_equal(got, ref)  # it really ran the quantized graph
    assert np.abs(got - ref).max() < 0.25 * np.abs(ref).max()

"""The score stage equals HF AutoModelForSequenceClassification and FlagReranker (fp32, CPU)."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rerank_ray import schema
from rerank_ray.runners import RunnerOptions, packed
from rerank_ray.scorer import ScoreStage
from rerank_ray.tiny_model import SAMPLE_TEXTS
from rerank_ray.tokenize import TokenizeStage

CPU = RunnerOptions(device="cpu")


def sample_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        q = SAMPLE_TEXTS[rng.integers(len(SAMPLE_TEXTS))]
        d = " ".join(
            SAMPLE_TEXTS[i] for i in rng.integers(0, len(SAMPLE_TEXTS), rng.integers(1, 6))
        )
        pairs.append((q, d))
    return pairs


def run_stages(model_dir, pairs, token_budget=None, max_length=512):
    batch = pa.table(
        {
            "query_id": [f"q{i}" for i in range(len(pairs))],
            "query": [q for q, _ in pairs],
            "doc_id": [f"d{i}" for i in range(len(pairs))],
            "doc": [d for _, d in pairs],
        }
    )
    tokens = TokenizeStage(str(model_dir), max_length, max_length * 3 // 4)(batch)
    return ScoreStage(str(model_dir), CPU, token_budget=token_budget)(tokens)


def hf_logits(model_dir, pairs):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    inputs = tok([q for q, _ in pairs], [d for _, d in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.view(-1).float().numpy()


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
@pytest.mark.parametrize("token_budget", [None, 512])
def test_scores_equal_hf_logits_in_input_order(kind, token_budget, request):
    model_dir = request.getfixturevalue(kind)
    pairs = sample_pairs(40)
    out = run_stages(model_dir, pairs, token_budget=token_budget)
    ref = hf_logits(model_dir, pairs)
    got = out[schema.SCORE].to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert np.std(ref) > 1e-3  # the comparison is between distinct scores, not constants
    np.testing.assert_allclose(out[schema.SCORE_NORM].to_numpy(), 1 / (1 + np.exp(-ref)), atol=1e-5)
    assert out[schema.SCORE].type == pa.float32()
    assert not {schema.INPUT_IDS, schema.NUM_TOKENS} & set(out.column_names)


def test_scores_equal_flagreranker(tiny_model_dir):
    import FlagEmbedding as flag  # the reference: pinned in constraints.txt, never skipped

    pairs = sample_pairs(30, seed=3)
    reranker = flag.FlagReranker(str(tiny_model_dir), use_fp16=False, devices=["cpu"])
    ref = np.asarray(reranker.compute_score([list(p) for p in pairs]), dtype=np.float64)
    got = run_stages(tiny_model_dir, pairs)[schema.SCORE].to_numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_rejected_rows_get_null_scores(tiny_model_dir):
    pairs = sample_pairs(5)
    pairs[2] = (pairs[2][0], "")
    out = run_stages(tiny_model_dir, pairs)
    scores = out[schema.SCORE].to_pylist()
    assert scores[2] is None and all(s is not None for i, s in enumerate(scores) if i != 2)
    assert out[schema.REJECT_REASON].to_pylist()[2] == "empty_doc"


def test_concurrent_calls_of_one_stage_equal_one_at_a_time(tiny_model_dir):
    """The job runs several calls of one scoring actor at once in threads (``scorer_calls``):
    each call's scores must be those of the same block scored alone."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = [sample_pairs(30 + 7 * i, seed=i) for i in range(6)]
    tokenize = TokenizeStage(str(tiny_model_dir), 512, 384)
    tables = [
        tokenize(
            pa.table(
                {
                    "query_id": [f"q{i}" for i in range(len(b))],
                    "query": [q for q, _ in b],
                    "doc_id": [f"d{i}" for i in range(len(b))],
                    "doc": [d for _, d in b],
                }
            )
        )
        for b in blocks
    ]
    stage = ScoreStage(str(tiny_model_dir), CPU, token_budget=600, concurrent_calls=3)
    alone = [stage(t)[schema.SCORE].to_numpy() for t in tables]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(stage, tables * 3))
    for i, out in enumerate(together):
        np.testing.assert_array_equal(out[schema.SCORE].to_numpy(), alone[i % len(tables)])
        assert out["doc_id"].to_pylist() == tables[i % len(tables)]["doc_id"].to_pylist()


def test_fused_kernels_fall_back_to_eager_ops_when_their_check_fails(
    tiny_model_dir, monkeypatch, caplog
):
    """A GPU where the Triton kernel cannot compile (or computes wrong) still scores, with
    the eager ops and a warning that says why; --no-fused-kernels never runs the check."""
    from rerank_ray.runners import kernels

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "available", lambda device: True)
    monkeypatch.setattr(
        kernels, "self_check", lambda device, dtype, head_dim, width: "CompilationError: sm_52"
    )
    with caplog.at_level("WARNING", logger="rerank_ray.runners.packed"):
        runner = packed.from_model(model, cpu, torch.float32, RunnerOptions())
    assert runner.fused_layer_norm is False and runner.triton_gelu is False
    assert runner.attention != "triton"
    assert "Fused kernels off" in caplog.text and "CompilationError: sm_52" in caplog.text

    def must_not_run(device, dtype, head_dim, width):
        raise AssertionError("self_check ran with fused_kernels off")

    monkeypatch.setattr(kernels, "self_check", must_not_run)
    assert (
        packed.from_model(
            model, cpu, torch.float32, RunnerOptions(fused_kernels=False)
        ).fused_layer_norm
        is False
    )

    ids = np.array([0, 5, 6, 2, 2, 7, 8, 9, 2], dtype=np.int32)
    offsets = np.array([0, 9], dtype=np.int64)
    with torch.inference_mode():
        want = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits.view(-1)
    np.testing.assert_allclose(runner.score(ids, offsets, None), want.numpy(), atol=1e-4)


def test_packed_runner_uses_the_triton_attention_only_for_16_bit_weights(
    tiny_model_dir, monkeypatch
):
    """Where the kernels pass their check, fp16/bf16 get the Triton attention, the fused
    add+LayerNorm and the Triton GELU; float32 keeps the other attention (Triton would run its
    dots in TF32) and PyTorch's GELU."""
    from rerank_ray.runners import kernels

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "available", lambda device: True)
    checked = []
    monkeypatch.setattr(
        kernels,
        "self_check",
        lambda device, dtype, head_dim, width: checked.append((head_dim, width)),
    )
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    supported = kernels.attention_supported(head_dim)
    half = packed.from_model(model, cpu, torch.float16, RunnerOptions())
    assert half.fused_layer_norm is True
    assert (half.attention == "triton") is supported
    assert half.triton_gelu is (model.config.hidden_act == "gelu")
    full = packed.from_model(model, cpu, torch.float32, RunnerOptions())
    assert full.fused_layer_norm is True and full.attention != "triton"
    assert full.triton_gelu is False
    # float32 checks only add+LayerNorm and GELU: no attention kernel to check, none to fail;
    # add+LayerNorm at the model's hidden size, the variant its forward compiles.
    width = model.config.hidden_size
    assert checked == [(head_dim if supported else None, width), (None, width)]
    # --fast-gelu puts the (tanh) GELU in the matmul epilogue: no separate GELU pass then.
    opts = packed.kernel_options(model.config, cpu, torch.float16, RunnerOptions(fast_gelu=True))
    assert opts["gelu_epilogue"] is True and opts["triton_gelu"] is False


def test_runner_from_the_checkpoint_equals_the_one_from_the_hf_model(tiny_model_dir, model_copy):
    """The scoring actor's GPU start reads the checkpoint without transformers; here on CPU:
    the same options and the same scores as the runner built from the loaded HF model, and
    None for a directory it does not read plainly (the actor then loads through
    transformers)."""
    import json

    cpu = torch.device("cpu")
    direct = packed.from_checkpoint(tiny_model_dir, cpu, torch.float32, RunnerOptions())
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir)).eval()
    via_hf = packed.from_model(model, cpu, torch.float32, RunnerOptions())
    assert (direct.attention, direct.fused_layer_norm, direct.triton_gelu) == (
        via_hf.attention,
        via_hf.fused_layer_norm,
        via_hf.triton_gelu,
    )
    ids = np.array([0, 5, 6, 2, 2, 7, 8, 9, 2, 0, 11, 2], dtype=np.int32)
    offsets = np.array([0, 9, 12], dtype=np.int64)
    np.testing.assert_array_equal(direct.score(ids, offsets), via_hf.score(ids, offsets))
    config = json.loads((model_copy / "config.json").read_text())
    del config["architectures"]
    (model_copy / "config.json").write_text(json.dumps(config))
    assert packed.from_checkpoint(model_copy, cpu, torch.float32, RunnerOptions()) is None

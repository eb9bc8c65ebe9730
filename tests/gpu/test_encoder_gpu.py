"""GPU checks of the padding-free encoder and the autotuned budget (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_ray.autotune import autotune_token_budget
from rerank_ray.backoff import TokenBudget, score_microbatches
from rerank_ray.packing import MicroBatch
from rerank_ray.runners.attention import varlen_attention_available
from rerank_ray.runners.encoder import PackedEncoder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


VOCAB = 1000
MAX_LENGTH = 512


def _model(dtype):
    from rerank_ray.tiny_model import random_classifier, xlmr_config

    cfg = xlmr_config(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=MAX_LENGTH + 2,  # XLM-R numbers positions from pad_token_id + 1
    )
    return random_classifier(cfg).to("cuda", dtype)


def _batch(n, seed=0):
    """``n`` packed rows of random lengths, longest first (as the scorer packs them)."""
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(2, MAX_LENGTH, n))[::-1]
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    ids = rng.integers(3, VOCAB, int(offsets[-1])).astype(np.int32)
    ids[offsets[:-1]] = 0
    return ids, offsets


def _hf(model, ids, offsets):
    lengths = np.diff(offsets)
    padded = torch.ones(len(lengths), int(lengths.max()), dtype=torch.long)
    for i in range(len(lengths)):
        padded[i, : lengths[i]] = torch.from_numpy(
            ids[offsets[i] : offsets[i + 1]].astype(np.int64)
        )
    padded = padded.cuda()
    with torch.inference_mode():
        return model(input_ids=padded, attention_mask=padded != 1).logits.view(-1).float().cpu()


@pytest.mark.skipif(not varlen_attention_available(), reason="no varlen_attn in this torch")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_matches_hf_padded(dtype):
    model = _model(dtype)
    ids, offsets = _batch(64)
    enc = PackedEncoder(model)
    assert enc.attention == "varlen"
    got = enc.score(ids, offsets)
    want = _hf(model, ids, offsets).numpy()
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_sdpa_fp32_on_gpu_matches_hf_padded():
    model = _model(torch.float32)
    ids, offsets = _batch(32, seed=1)
    got = PackedEncoder(model, attention="sdpa").score(ids, offsets)
    np.testing.assert_allclose(got, _hf(model, ids, offsets).numpy(), atol=1e-3, rtol=0)


def test_autotune_respects_a_memory_cap_and_backoff_keeps_rows(tmp_path):
    model = _model(torch.float16)
    enc = PackedEncoder(model)
    free, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_reserved()
    try:
        # about 1.5 GiB of room beyond what is already reserved: a 16 GB-class headroom
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 1.5 * 2**30) / total))
        budget = autotune_token_budget(
            enc, model="tiny", dtype="float16", max_length=512, cache_path=tmp_path / "c.json"
        )
        assert 512 <= budget <= 65_536 and budget % 512 == 0
        # ~1M tokens in one forward: its 4-layer activations (~2 GiB for the feed-forward
        # alone) cannot fit in 1.5 GiB, so the budget must back off on real OOM.
        ids, offsets = _batch(4000, seed=2)
        tb = TokenBudget(budget * 64, 512)
        (scores,) = score_microbatches(enc, [MicroBatch(ids, offsets)], tb)
        assert tb.value < budget * 64
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    np.testing.assert_allclose(scores, enc.score(ids, offsets), atol=2e-2, rtol=0)


@pytest.mark.skipif(not varlen_attention_available(), reason="no varlen_attn in this torch")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_norm_matches_the_eager_encoder(dtype):
    model = _model(dtype)
    ids, offsets = _batch(64, seed=7)
    eager = PackedEncoder(model).score(ids, offsets)
    fused = PackedEncoder(model, fused_layer_norm=True).score(ids, offsets)
    ref = _hf(model.float(), ids, offsets).numpy()
    # Same rounding points as the eager pair: no further from fp32 than eager is (+ noise).
    assert np.abs(fused - ref).max() <= 1.5 * np.abs(eager - ref).max() + 1e-3


@pytest.mark.skipif(not varlen_attention_available(), reason="no varlen_attn in this torch")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_attention_matches_flash_attention(dtype):
    """The Triton varlen attention alone against FA2's varlen_attn on real GPU shapes (long
    and short sequences, ragged ends), then the whole encoder with the default kernels
    against fp32 HF."""
    from torch.nn.attention.varlen import varlen_attn

    from rerank_ray.runners import kernels

    gen = torch.Generator(device="cpu").manual_seed(3)
    lengths = np.array([1, 7, 64, 65, 127, 128, 129, 300, 511, 512, 33])
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lengths))), dtype=torch.int32).cuda()
    n_tok = int(lengths.sum())
    qkv = torch.randn(n_tok, 3 * 8 * 64, generator=gen).to("cuda", dtype)
    q, k, v = qkv.view(n_tok, 3, 8, 64).unbind(1)
    want = varlen_attn(q, k, v, cu, cu, 512, 512).reshape(n_tok, -1).float()
    got = kernels.varlen_attention(qkv, cu, 8).float()
    assert (got - want).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 3e-3)

    model = _model(dtype)
    ids, offsets = _batch(64, seed=7)
    eager_scores = PackedEncoder(model).score(ids, offsets)
    every_kernel = PackedEncoder(model, fused_layer_norm=True, attention="triton").score(
        ids, offsets
    )
    ref = _hf(model.float(), ids, offsets).numpy()
    err = np.abs(every_kernel - ref).max()
    assert err <= 1.5 * np.abs(eager_scores - ref).max() + 1e-3


@pytest.mark.parametrize("attention", ["varlen", "triton", "sdpa"])
def test_last_layer_on_first_tokens_matches_the_whole_last_layer(attention):
    """The default last layer (first tokens only: FA2 with one query per sequence, the Triton
    kernel on each sequence's first row block, or SDPA on the first query) against the whole
    last layer, fp16, and both against fp32 HF."""
    if attention == "varlen" and not varlen_attention_available():
        pytest.skip("no varlen_attn in this torch")
    model = _model(torch.float16)
    ids, offsets = _batch(64, seed=9)
    pruned = PackedEncoder(model, attention=attention)
    whole = PackedEncoder(model, attention=attention, first_token_last_layer=False)
    assert pruned.first_token_last_layer
    got, full = pruned.score(ids, offsets), whole.score(ids, offsets)
    ref = _hf(model.float(), ids, offsets).numpy()
    assert np.abs(got - full).max() < 1e-2
    assert np.abs(got - ref).max() <= 1.5 * np.abs(full - ref).max() + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_gelu_is_within_one_ulp_of_torch_and_scores_as_eager(dtype):
    from rerank_ray.runners import kernels

    h = (torch.randn(4096, 1023, device="cuda") * 3).to(dtype)
    got, want = kernels.gelu_(h.clone()), torch.nn.functional.gelu(h)
    ulp = torch.nextafter(want.abs(), torch.full_like(want, float("inf"))) - want.abs()
    body = want.abs() >= 1e-3
    assert ((got - want).abs()[body] <= ulp[body]).all()
    assert (got - want).abs().max().item() <= 1e-2

    model = _model(dtype)
    ids, offsets = _batch(64, seed=11)
    default = PackedEncoder(model, fused_layer_norm=True, attention="triton")
    with_gelu = PackedEncoder(model, fused_layer_norm=True, attention="triton", triton_gelu=True)
    ref = _hf(model.float(), ids, offsets).numpy()
    got_s, def_s = with_gelu.score(ids, offsets), default.score(ids, offsets)
    assert np.abs(got_s - ref).max() <= 1.5 * np.abs(def_s - ref).max() + 1e-3


def test_triton_attention_takes_more_sequences_than_a_grid_axis_of_65535():
    """A large token budget of short pairs can hold >65,535 sequences in one micro-batch: the
    kernel puts sequences on the grid's x axis. One-token sequences attend only to
    themselves, so the output is exactly v."""
    from rerank_ray.runners import kernels

    n_seq, heads = 70_000, 2
    cu = torch.arange(n_seq + 1, dtype=torch.int32, device="cuda")
    qkv = torch.randn(n_seq, 3 * heads * 64, device="cuda", dtype=torch.float16)
    out = kernels.varlen_attention(qkv, cu, heads)
    torch.testing.assert_close(out, qkv[:, 2 * heads * 64 :], rtol=0, atol=1e-3)


def test_scoring_actor_reads_the_checkpoint_and_scores_as_through_transformers(tmp_path):
    """On a GPU the scoring actor builds its encoder from config.json + safetensors (no
    transformers): same scores, fp16, default kernels, as the encoder built from the HF
    model."""
    from rerank_ray.runners import RunnerOptions, packed
    from rerank_ray.scorer import ScoreStage

    model = _model(torch.float32)
    model.save_pretrained(tmp_path / "m")
    stage = ScoreStage(str(tmp_path / "m"), RunnerOptions(device="cuda"), token_budget=8192)
    assert stage.load_path == "checkpoint"
    hf = model.to(torch.float16)
    via_hf = packed.from_model(hf, torch.device("cuda"), torch.float16, RunnerOptions())
    ids, offsets = _batch(32, seed=11)
    np.testing.assert_array_equal(stage.runner.score(ids, offsets), via_hf.score(ids, offsets))

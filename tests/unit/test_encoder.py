"""The padding-free encoder equals Hugging Face's padded forward (fp32, CPU, tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_ray.runners.encoder import PackedEncoder
from rerank_ray.tiny_model import bert_config, random_classifier, xlmr_config

VOCAB = 97


def _xlmr(hidden: int = 32) -> torch.nn.Module:
    """Tiny XLM-R, 4 heads (head size hidden / 4; the Triton attention needs >= 16)."""
    cfg = xlmr_config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=66,
    )
    return random_classifier(cfg, seed=0)


def _bert() -> torch.nn.Module:
    cfg = bert_config(vocab_size=VOCAB, num_attention_heads=4, max_position_embeddings=64)
    return random_classifier(cfg, seed=1)


@pytest.fixture(scope="module")
def xlmr() -> torch.nn.Module:
    return _xlmr()


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return _bert()


def _batch(lengths, seed=0, with_types=False, pad_id=1):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in lengths]
    for s in seqs:
        s[0] = 0  # <s> / [CLS]-like first token
    types = None
    if with_types:
        types = [(np.arange(len(s)) >= len(s) // 2).astype(np.int8) for s in seqs]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return seqs, types, offsets


def _hf_padded(model, seqs, types, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    tt = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[i, : len(s)] = 1
        if types is not None:
            tt[i, : len(s)] = torch.from_numpy(types[i].astype(np.int64))
    kwargs = {"token_type_ids": tt} if types is not None else {}
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits.view(-1).numpy()


LENGTHS = [1, 2, 5, 17, 33, 64, 7, 40]


def test_xlmr_matches_hf_padded_forward(xlmr):
    seqs, _, offsets = _batch(LENGTHS)
    got = PackedEncoder(xlmr).score(np.concatenate(seqs), offsets, None)
    want = _hf_padded(xlmr, seqs, None, pad_id=1)
    assert got.dtype == np.float32 and got.shape == (len(LENGTHS),)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_xlmr_pad_token_inside_a_sequence_uses_hf_positions(xlmr):
    seqs, _, offsets = _batch([9, 12, 4], seed=3)
    seqs[1][5] = 1  # a pad id mid-sequence: HF gives it position padding_idx and skips it
    got = PackedEncoder(xlmr).score(np.concatenate(seqs), offsets, None)
    np.testing.assert_allclose(got, _hf_padded(xlmr, seqs, None, pad_id=1), atol=1e-4, rtol=0)


def test_bert_with_token_types_matches_hf_padded_forward(bert):
    seqs, types, offsets = _batch(LENGTHS, seed=2, with_types=True)
    got = PackedEncoder(bert).score(np.concatenate(seqs), offsets, np.concatenate(types))
    want = _hf_padded(bert, seqs, types, pad_id=0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bert_without_token_types_defaults_to_zero(bert):
    seqs, _, offsets = _batch([3, 30, 11], seed=4)
    got = PackedEncoder(bert).score(np.concatenate(seqs), offsets, None)
    np.testing.assert_allclose(got, _hf_padded(bert, seqs, None, pad_id=0), atol=1e-4, rtol=0)


def test_score_does_not_depend_on_batch_company(xlmr):
    seqs, _, offsets = _batch(LENGTHS, seed=5)
    enc = PackedEncoder(xlmr)
    together = enc.score(np.concatenate(seqs), offsets, None)
    alone = [enc.score(s, np.array([0, len(s)]), None)[0] for s in seqs]
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_rejects_bad_offsets_and_too_long_sequences(xlmr):
    enc = PackedEncoder(xlmr)
    with pytest.raises(ValueError, match="offsets end at"):
        enc.score(np.zeros(5, np.int32), np.array([0, 3]), None)
    with pytest.raises(ValueError, match="at least one token"):
        enc.score(np.zeros(3, np.int32), np.array([0, 3, 3]), None)
    with pytest.raises(ValueError, match="at most 64"):
        enc.score(np.full(65, 5, np.int32), np.array([0, 65]), None)


@pytest.mark.parametrize("model_name", ["xlmr", "bert"])
def test_last_layer_on_first_tokens_only_equals_the_whole_last_layer(model_name, request):
    model = request.getfixturevalue(model_name)
    seqs, types, offsets = _batch(LENGTHS, seed=6, with_types=model_name == "bert")
    ids = np.concatenate(seqs)
    tt = np.concatenate(types) if types else None
    pruned = PackedEncoder(model)  # the default
    whole = PackedEncoder(model, first_token_last_layer=False)
    assert pruned.first_token_last_layer and not whole.first_token_last_layer
    rows = []
    up = pruned._up
    pruned._up = lambda x, w, b: rows.append(x.shape[0]) or up(x, w, b)
    got = pruned.score(ids, offsets, tt)
    # every layer but the last runs on all tokens, the last on one row per sequence
    assert rows == [len(ids)] * (len(pruned._layers) - 1) + [len(seqs)]
    np.testing.assert_allclose(got, whole.score(ids, offsets, tt), atol=1e-5, rtol=0)
    want = _hf_padded(model, seqs, types, pad_id=1 if model_name == "xlmr" else 0)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_rejects_unsupported_attention_and_varlen_on_cpu(xlmr):
    with pytest.raises(ValueError, match="attention must be one of"):
        PackedEncoder(xlmr, attention="flash")
    with pytest.raises(ValueError, match="needs CUDA"):
        PackedEncoder(xlmr, attention="varlen")

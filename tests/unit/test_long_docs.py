"""long_docs: chunk — windows cut on token ids and framed as pairs, scored as sequences of
their own, folded into one row per pair; equal to HF on each (query, window) pair."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rerank_ray import schema
from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.modes.config import NightlyConfig
from rerank_ray.modes.groups import nightly_group
from rerank_ray.pairs import Chunking, window_spans
from rerank_ray.runners import RunnerOptions
from rerank_ray.scorer import ScoreStage, fold_windows
from rerank_ray.tiny_model import SAMPLE_TEXTS
from rerank_ray.tokenize import TokenizeStage

CPU = RunnerOptions(device="cpu")
KINDS = ["tiny_model_dir", "tiny_bert_dir"]


def table(pairs):
    return pa.table(
        {
            "query_id": [f"q{i}" for i in range(len(pairs))],
            "query": [q for q, _ in pairs],
            "doc_id": [f"d{i}" for i in range(len(pairs))],
            "doc": [d for _, d in pairs],
        }
    )


def long_pairs(n, seed, words=(1, 40)):
    """Queries (some long enough to be cut) with documents of ``words`` sample texts each."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        q = SAMPLE_TEXTS[rng.integers(len(SAMPLE_TEXTS))]
        if i % 5 == 0:
            q = " ".join([q] * 6)
        k = rng.integers(*words)
        pairs.append((q, " ".join(SAMPLE_TEXTS[j] for j in rng.integers(0, 10, k))))
    return pairs


def reference_windows(tok, query, doc, max_length, qmax, chunking):
    """The (query, window) pairs by the Rust tokenizer's own overflow windowing (truncation
    with a stride) and post-processor, independently of the stage's window code. Returns
    [(ids, type_ids)] of the windows kept, and whether anything was cut."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    q = backend.encode(query, add_special_tokens=False)
    q_cut = len(q.ids) > qmax
    q.truncate(qmax)
    d = backend.encode(doc, add_special_tokens=False)
    room = max_length - backend.num_special_tokens_to_add(True) - len(q.ids)
    d.truncate(room, stride=chunking.overlap)
    windows = [d, *d.overflowing]
    pairs = [backend.post_process(q, w, True) for w in windows[: chunking.max_chunks]]
    return [(p.ids, p.type_ids) for p in pairs], q_cut or len(windows) > chunking.max_chunks


def hf_window_scores(model_dir, windows):
    """HF AutoModelForSequenceClassification logits of each (ids, type_ids) pair."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    longest = max(len(ids) for ids, _ in windows)
    ids = torch.full((len(windows), longest), tok.pad_token_id)
    types = torch.zeros((len(windows), longest), dtype=torch.long)
    mask = torch.zeros((len(windows), longest), dtype=torch.long)
    for i, (w_ids, w_types) in enumerate(windows):
        ids[i, : len(w_ids)] = torch.tensor(w_ids)
        types[i, : len(w_ids)] = torch.tensor(w_types)
        mask[i, : len(w_ids)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in tok.model_input_names:
        inputs["token_type_ids"] = types
    with torch.no_grad():
        return model(**inputs).logits.view(-1).numpy()


# --- windows -----------------------------------------------------------------------------
def test_window_spans_by_hand():
    lengths = np.array([0, 5, 10, 11, 30, 100])
    starts, lens, count, cut = window_spans(lengths, np.full(6, 10), Chunking(3, 4))
    assert count.tolist() == [1, 1, 1, 2, 4, 4]
    assert starts.tolist() == [0, 0, 0, 0, 7, 0, 7, 14, 21, 0, 7, 14, 21]
    assert lens.tolist() == [0, 5, 10, 10, 4, 10, 10, 10, 9, 10, 10, 10, 10]
    assert cut.tolist() == [False] * 5 + [True]


def test_window_spans_cover_every_token_once_past_the_overlap():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 400, 500)
    rooms = rng.integers(9, 60, 500)
    chunking = Chunking(overlap=8, max_chunks=5)
    starts, lens, count, cut = window_spans(lengths, rooms, chunking)
    at = 0
    for row, (n, room) in enumerate(zip(lengths, rooms, strict=True)):
        s, ln = starts[at : at + count[row]], lens[at : at + count[row]]
        at += count[row]
        assert 1 <= count[row] <= chunking.max_chunks
        assert ln.max() <= room and (ln[1:] > chunking.overlap).all()  # none empty
        assert (ln[0] > 0) == (n > 0)
        # consecutive windows share exactly the overlap; the windows reach the end or the cap
        assert (s[1:] == s[:-1] + room - chunking.overlap).all()
        assert (s[:-1] + ln[:-1] == s[1:] + chunking.overlap).all()
        reach = s[-1] + ln[-1]
        assert reach == min(n, chunking.coverage(room))
        assert cut[row] == (n > reach)
    assert at == len(starts)


@pytest.mark.parametrize("kind", KINDS)
def test_windows_equal_the_tokenizers_overflow_windows(kind, request):
    """Every window equals the pair the tokenizer builds from its stride windowing: ids,
    token types, boundaries, overlap, the cap and the truncated flag; rejects stay empty."""
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_length, qmax, chunking = 48, 12, Chunking(overlap=6, max_chunks=4)
    pairs = long_pairs(30, seed=1)
    pairs[7] = (pairs[7][0], "   ")
    stage = TokenizeStage(str(model_dir), max_length, qmax, chunking=chunking)
    out = stage(table(pairs))
    assert out[schema.INPUT_IDS].type == pa.list_(pa.list_(pa.int32()))
    with_types = schema.TOKEN_TYPE_IDS in out.column_names
    assert with_types == (kind == "tiny_bert_dir")
    seen = {"several": 0, "capped": 0, "query_cut": 0}
    for row, (q, d) in enumerate(pairs):
        got = out[schema.INPUT_IDS][row].as_py()
        if row == 7:
            assert out[schema.REJECT_REASON][row].as_py() == "empty_doc"
            assert got == [] and out[schema.NUM_TOKENS][row].as_py() == 0
            continue
        ref, cut = reference_windows(tok, q, d, max_length, qmax, chunking)
        assert got == [ids for ids, _ in ref], row
        if with_types:
            assert out[schema.TOKEN_TYPE_IDS][row].as_py() == [t for _, t in ref], row
        assert out[schema.NUM_TOKENS][row].as_py() == sum(len(ids) for ids, _ in ref)
        assert out[schema.TRUNCATED][row].as_py() is cut, row
        assert all(len(ids) <= max_length for ids in got)
        seen["several"] += len(got) > 1
        seen["capped"] += len(got) == chunking.max_chunks and cut
        seen["query_cut"] += len(tok(q, add_special_tokens=False)["input_ids"]) > qmax
    assert min(seen.values()) >= 2, seen  # the block holds every case


@pytest.mark.parametrize("kind", KINDS)
def test_document_of_50000_words(kind, request):
    """Tokenized once (as far as the windows reach); with a cap the windows cover its start,
    with room for all they cover every token, each exactly once past the overlap."""
    model_dir = request.getfixturevalue(kind)
    rng = np.random.default_rng(2)
    words = " ".join(rng.choice(" ".join(SAMPLE_TEXTS).split(), 50_000))
    query = SAMPLE_TEXTS[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    doc_ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert len(doc_ids) >= 50_000
    capped = TokenizeStage(str(model_dir), 512, 384, chunking=Chunking(64, 8))
    limits = []
    ids_of = capped._ids
    capped._ids = lambda texts, limit: limits.append(limit) or ids_of(texts, limit)
    out = capped(table([(query, words)]))
    windows = out[schema.INPUT_IDS][0].as_py()
    assert len(windows) == 8 and out[schema.TRUNCATED][0].as_py() is True
    assert len(limits) == 2 and limits[1] < 8 * 512  # the document cut where windows end
    assert all(len(w) == 512 for w in windows)
    full_stage = TokenizeStage(str(model_dir), 512, 384, chunking=Chunking(64, 10_000))
    full = full_stage(table([(query, words)]))
    windows = full[schema.INPUT_IDS][0].as_py()
    assert full[schema.TRUNCATED][0].as_py() is False
    t = full_stage.template
    head = len(t.prefix) + len(tokenizer(query, add_special_tokens=False)["input_ids"])
    head += len(t.middle)
    doc_parts = [w[head : len(w) - len(t.suffix)] for w in windows]
    assert all(len(p) > 64 for p in doc_parts)  # no window without a token of its own
    assert all(w[:head] == windows[0][:head] for w in windows)  # the same query and framing
    rebuilt = doc_parts[0] + [t for part in doc_parts[1:] for t in part[64:]]
    assert rebuilt == doc_ids


# --- scores ------------------------------------------------------------------------------
def run_stages(model_dir, pairs, max_length, qmax, chunking=None, aggregate=None, budget=None):
    tokens = TokenizeStage(str(model_dir), max_length, qmax, chunking=chunking)(table(pairs))
    stage = ScoreStage(
        str(model_dir), CPU, max_length=max_length, token_budget=budget, chunk_aggregate=aggregate
    )
    return stage(tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", ["max", "first", "mean"])
def test_chunk_with_one_window_equals_truncate_exactly(kind, aggregate, request):
    model_dir = request.getfixturevalue(kind)
    pairs = long_pairs(40, seed=3, words=(1, 3))
    pairs[5] = (None, "x")
    truncated = run_stages(model_dir, pairs, 128, 32)
    chunked = run_stages(model_dir, pairs, 128, 32, Chunking(16, 4), aggregate)
    scored = chunked.filter(pa.compute.is_null(chunked[schema.REJECT_REASON]))
    assert set(scored[schema.NUM_CHUNKS].to_pylist()) == {1}  # every document fits one window
    assert set(scored[schema.BEST_CHUNK].to_pylist()) == {0}
    assert chunked[schema.NUM_CHUNKS][5].as_py() is None
    assert chunked.drop_columns(list(schema.CHUNK_COLUMNS)).equals(truncated)
    assert any(truncated[schema.TRUNCATED].to_pylist())  # long queries are cut in both


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aggregate", ["max", "first", "mean"])
def test_aggregate_equals_hf_on_each_window(kind, aggregate, request):
    """Each (query, window) pair scored alone by HF AutoModelForSequenceClassification, then
    folded: the job's score, num_chunks and best_chunk agree (fp32, CPU)."""
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_length, qmax, chunking = 48, 12, Chunking(overlap=6, max_chunks=4)
    pairs = long_pairs(24, seed=4)
    out = run_stages(model_dir, pairs, max_length, qmax, chunking, aggregate, budget=200)
    refs = [reference_windows(tok, q, d, max_length, qmax, chunking)[0] for q, d in pairs]
    flat = hf_window_scores(model_dir, [w for ref in refs for w in ref])
    per_row = np.array([len(ref) for ref in refs])
    rows = np.split(flat, np.cumsum(per_row)[:-1])
    fold = {"max": np.max, "first": lambda s: s[0], "mean": np.mean}[aggregate]
    expected = np.array([fold(s) for s in rows])
    np.testing.assert_allclose(out[schema.SCORE].to_numpy(), expected, atol=1e-4, rtol=0)
    norm = 1 / (1 + np.exp(-expected))
    np.testing.assert_allclose(out[schema.SCORE_NORM].to_numpy(), norm, atol=1e-5)
    assert out[schema.NUM_CHUNKS].to_pylist() == per_row.tolist()
    best = out[schema.BEST_CHUNK].to_numpy()
    assert all(s[b] >= s.max() - 1e-4 for s, b in zip(rows, best, strict=True))
    # The comparison means something: windows of a pair score differently, and the best one
    # is not always the first.
    assert (per_row > 1).sum() >= 5 and (best > 0).sum() >= 2
    assert out[schema.NUM_CHUNKS].type == pa.int32() == out[schema.BEST_CHUNK].type


def test_fold_windows_by_hand():
    scores = np.array([1.0, 3.0, 2.0, -1.0, 5.0, 5.0, 0.5], dtype=np.float32)
    per_row = np.array([3, 1, 2, 1])
    got, count, best = fold_windows(scores, per_row, "max")
    assert got.tolist() == [3.0, -1.0, 5.0, 0.5] and best.tolist() == [1, 0, 0, 0]
    assert count.tolist() == [3, 1, 2, 1] and got.dtype == np.float32
    assert fold_windows(scores, per_row, "first")[0].tolist() == [1.0, -1.0, 5.0, 0.5]
    assert fold_windows(scores, per_row, "mean")[0].tolist() == [2.0, -1.0, 5.0, 0.5]
    with pytest.raises(ValueError, match="at least one"):
        fold_windows(scores, np.array([3, 0, 4]), "max")


def test_score_stage_refuses_a_mismatched_setting(tiny_model_dir):
    pairs = long_pairs(4, seed=5)
    windows = TokenizeStage(str(tiny_model_dir), 64, 16, chunking=Chunking(8, 2))(table(pairs))
    with pytest.raises(ValueError, match="long_docs"):
        ScoreStage(str(tiny_model_dir), CPU)(windows)
    plain = TokenizeStage(str(tiny_model_dir), 64, 16)(table(pairs))
    with pytest.raises(ValueError, match="long_docs"):
        ScoreStage(str(tiny_model_dir), CPU, chunk_aggregate="max")(plain)


def test_nightly_mode_keeps_the_chunk_columns(tiny_model_dir):
    pairs = long_pairs(12, seed=6)
    pairs[3] = (pairs[3][0], "")
    out = run_stages(tiny_model_dir, pairs, 48, 12, Chunking(6, 4), "max")
    out = out.set_column(0, "query_id", pa.array(["q"] * out.num_rows))
    ranked = nightly_group(out, NightlyConfig(top_k=5))
    assert ranked.num_rows == out.num_rows
    by_doc = dict(
        zip(ranked["doc_id"].to_pylist(), ranked[schema.NUM_CHUNKS].to_pylist(), strict=True)
    )
    assert by_doc == dict(
        zip(out["doc_id"].to_pylist(), out[schema.NUM_CHUNKS].to_pylist(), strict=True)
    )


# --- configuration -----------------------------------------------------------------------
BASE = {"input": "s3://b/in/", "output": "s3://b/out/"}


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"long_docs": "split"}, "long_docs"),
        ({"chunk_aggregate": "median"}, "chunk_aggregate"),
        ({"max_chunks_per_doc": 0}, "max_chunks_per_doc"),
        ({"chunk_overlap": -1}, "chunk_overlap"),
        # 128 - 96 (3/4 for the query) - 4 special tokens = 28-token windows
        ({"long_docs": "chunk", "max_length": 128}, r"--chunk-overlap 7\b"),
        ({"long_docs": "chunk", "max_length": 128, "chunk_overlap": 28}, "28"),
        ({"long_docs": "chunk", "max_length": 64, "query_max_length": 60}, "Raise --max-length"),
    ],
)
def test_invalid_long_docs_settings_are_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig(**BASE, **bad)


def test_long_docs_defaults_and_flags():
    cfg = JobConfig(**BASE)
    assert (cfg.long_docs, cfg.chunk_overlap, cfg.max_chunks_per_doc, cfg.chunk_aggregate) == (
        "truncate",
        64,
        8,
        "max",
    )
    # An overlap too large for chunking is not an error while truncating.
    assert JobConfig(**BASE, max_length=64, chunk_overlap=200).long_docs == "truncate"
    cfg = JobConfig.from_dict(
        {**BASE, "long-docs": "chunk", "chunk-overlap": "32", "max-chunks-per-doc": "3"}
    )
    assert (cfg.long_docs, cfg.chunk_overlap, cfg.max_chunks_per_doc) == ("chunk", 32, 3)


def test_tokenize_stage_checks_the_overlap_with_the_models_special_tokens(tiny_bert_dir):
    # BERT frames a pair with 3 special tokens: 64 - 16 - 3 = 45-token windows.
    TokenizeStage(str(tiny_bert_dir), 64, 16, chunking=Chunking(44, 2))
    with pytest.raises(ConfigError, match="45 tokens"):
        TokenizeStage(str(tiny_bert_dir), 64, 16, chunking=Chunking(45, 2))

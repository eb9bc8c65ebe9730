"""The tokenize stage builds the same ids as FlagReranker's id-level algorithm."""

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from rerank_ray import schema
from rerank_ray.pairs import PairTemplate, assemble_pairs
from rerank_ray.tokenize import TokenizeStage

PAIRS = [
    ("what is the capital of france", "paris is the capital and most populous city of france"),
    ("solar panels", "photovoltaic cells convert sunlight directly into electric current"),
    ("la capitale", "die hauptstadt von deutschland ist berlin"),
]


def table(pairs, **overrides):
    cols = {
        "query_id": [f"q{i}" for i in range(len(pairs))],
        "query": [q for q, _ in pairs],
        "doc_id": [f"d{i}" for i in range(len(pairs))],
        "doc": [d for _, d in pairs],
    }
    cols.update(overrides)
    return pa.table(cols)


def reference_ids(tok, query, doc, max_length, qmax):
    """FlagReranker (transformers v4): query cut to qmax, doc to max_length, then the pair
    with 'only_second' truncation. Done here with the Rust tokenizer's own truncation and
    post-processor, independently of the stage's template code."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    q = backend.encode(query, add_special_tokens=False)
    q.truncate(qmax)
    d = backend.encode(doc, add_special_tokens=False)
    d.truncate(max_length)
    backend.enable_truncation(max_length, strategy="only_second")
    pair = backend.post_process(q, d, True)
    backend.no_truncation()
    return pair.ids, pair.type_ids


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_untruncated_pairs_match_the_tokenizer(kind, request):
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = TokenizeStage(str(model_dir), max_length=512, query_max_length=384)(table(PAIRS))
    expected = tok([q for q, _ in PAIRS], [d for _, d in PAIRS])
    assert out[schema.INPUT_IDS].to_pylist() == expected["input_ids"]
    assert out[schema.NUM_TOKENS].to_pylist() == [len(x) for x in expected["input_ids"]]
    assert out[schema.TRUNCATED].to_pylist() == [False] * len(PAIRS)
    if "token_type_ids" in tok.model_input_names:
        assert out[schema.TOKEN_TYPE_IDS].to_pylist() == expected["token_type_ids"]
    else:
        assert schema.TOKEN_TYPE_IDS not in out.column_names


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_truncation_matches_flagreranker_algorithm(kind, request):
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_q = " ".join(["what is the capital of france"] * 8)
    long_d = " ".join(["paris is the capital and most populous city of france"] * 10)
    pairs = [(long_q, "paris"), ("solar panels", long_d), (long_q, long_d), PAIRS[0]]
    max_length, qmax = 32, 24
    out = TokenizeStage(str(model_dir), max_length=max_length, query_max_length=qmax)(table(pairs))
    for row, (q, d) in enumerate(pairs):
        ids, types = reference_ids(tok, q, d, max_length, qmax)
        assert out[schema.INPUT_IDS][row].as_py() == ids, row
        if schema.TOKEN_TYPE_IDS in out.column_names:
            assert out[schema.TOKEN_TYPE_IDS][row].as_py() == types, row
    assert out[schema.TRUNCATED].to_pylist() == [True, True, True, False]
    assert max(out[schema.NUM_TOKENS].to_pylist()) <= max_length


def reference_truncated(tok, query, doc, pair_ids, qmax):
    """Whether the reference pair lost tokens: the query past qmax, or any document token."""
    backend = tok.backend_tokenizer
    n_q = len(backend.encode(query, add_special_tokens=False).ids)
    n_d = len(backend.encode(doc, add_special_tokens=False).ids)
    untruncated = min(n_q, qmax) + n_d + backend.num_special_tokens_to_add(True)
    return n_q > qmax or len(pair_ids) < untruncated


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_per_query_block_matches_the_per_pair_reference(kind, request):
    """A block as the job sees it: queries repeated over many documents (not contiguous),
    long queries, long documents and both, a text with no tokens, and rejected rows in
    between. Every row equals its own pair built by the tokenizer (ids, token types,
    num_tokens, truncated); each distinct query is tokenized once."""
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    long_q = " ".join(["how do solar panels produce electricity"] * 4)
    long_d = " ".join(["paris is the capital and most populous city of france"] * 6)
    queries = [PAIRS[0][0], PAIRS[1][0], long_q, PAIRS[2][0]]
    docs = [PAIRS[0][1], PAIRS[1][1], long_d, PAIRS[2][1] + " berlin", "\u200b", long_d + " x"]
    rows = [(queries[(i * 3) % 4], docs[(i * 5) % 6]) for i in range(24)]
    rejected = {3: ("query", None), 8: ("doc", "   "), 15: ("query_id", None), 20: ("doc", "")}
    batch = table(rows).to_pydict()
    for row, (column, value) in rejected.items():
        batch[column][row] = value
    batch = pa.table(batch)
    max_length, qmax = 40, 12
    stage = TokenizeStage(str(model_dir), max_length=max_length, query_max_length=qmax)
    calls = []
    ids_of = stage._ids
    stage._ids = lambda texts, limit: calls.append(list(texts)) or ids_of(texts, limit)
    out = stage(batch)
    assert out.num_rows == batch.num_rows
    scorable = [i for i in range(len(rows)) if i not in rejected]
    assert sorted(calls[0]) == sorted({rows[i][0] for i in scorable})  # each query once
    assert calls[1] == [rows[i][1] for i in scorable]
    with_types = schema.TOKEN_TYPE_IDS in out.column_names
    cut = {"query": 0, "doc": 0}
    for row, (q, d) in enumerate(rows):
        got_ids = out[schema.INPUT_IDS][row].as_py()
        if row in rejected:
            assert out[schema.REJECT_REASON][row].as_py() is not None, row
            assert got_ids == [] and out[schema.NUM_TOKENS][row].as_py() == 0, row
            assert out[schema.TRUNCATED][row].as_py() is False, row
            continue
        ids, types = reference_ids(tok, q, d, max_length, qmax)
        assert out[schema.REJECT_REASON][row].as_py() is None, row
        assert got_ids == ids, row
        if with_types:
            assert out[schema.TOKEN_TYPE_IDS][row].as_py() == types, row
        assert out[schema.NUM_TOKENS][row].as_py() == len(ids), row
        truncated = reference_truncated(tok, q, d, ids, qmax)
        assert out[schema.TRUNCATED][row].as_py() is truncated, row
        cut["query"] += q == long_q
        cut["doc"] += truncated and q != long_q
    # The block holds every case this test is about.
    assert cut["query"] >= 2 and cut["doc"] >= 2
    assert any(q == long_q and d.startswith(long_d) for q, d in (rows[i] for i in scorable))
    assert with_types == (kind == "tiny_bert_dir")


def test_assemble_pairs_by_hand():
    """The numpy assembly on a template with a two-token middle and token types: queries
    shared by rows out of order, a query and a document cut, a document cut to nothing, a
    document with no tokens."""
    template = PairTemplate(
        prefix=(1,),
        middle=(2, 2),
        suffix=(3,),
        prefix_types=(0,),
        middle_types=(0, 1),
        suffix_types=(1,),
        query_type=0,
        doc_type=1,
    )
    query_ids = [[10, 11, 12], [20]]
    doc_ids = [[30, 31], [40, 41, 42, 43, 44], [], [50, 51], [60]]
    query_of_row = np.array([1, 0, 1, 0, 1])
    # max_length 8, 4 special tokens: a 2-token query (cut from 3) leaves 2 document tokens.
    ids, types, lengths, truncated = assemble_pairs(
        template, query_ids, query_of_row, doc_ids, max_length=8, query_max_length=2,
        with_types=True,
    )  # fmt: skip
    # Each pair's ids and, below them, their token types.
    want = [
        ([1, 20, 2, 2, 30, 31, 3],
         [0, 0, 0, 1, 1, 1, 1]),
        ([1, 10, 11, 2, 2, 40, 41, 3],
         [0, 0, 0, 0, 1, 1, 1, 1]),
        ([1, 20, 2, 2, 3],
         [0, 0, 0, 1, 1]),
        ([1, 10, 11, 2, 2, 50, 51, 3],
         [0, 0, 0, 0, 1, 1, 1, 1]),
        ([1, 20, 2, 2, 60, 3],
         [0, 0, 0, 1, 1, 1]),
    ]  # fmt: skip
    assert lengths.tolist() == [len(w) for w, _ in want]
    assert ids.tolist() == [t for w, _ in want for t in w]
    assert types.tolist() == [t for _, w in want for t in w]
    assert truncated.tolist() == [False, True, False, True, False]
    assert ids.dtype == np.int32 and types.dtype == np.int8 and lengths.dtype == np.int32
    # A query that fills max_length leaves no room: the document is cut to nothing.
    ids, types, lengths, truncated = assemble_pairs(
        template, [[10, 11, 12, 13]], np.array([0, 0]), [[30], []], max_length=8,
        query_max_length=4, with_types=False,
    )  # fmt: skip
    assert ids.tolist() == [1, 10, 11, 12, 13, 2, 2, 3] * 2
    assert lengths.tolist() == [8, 8] and truncated.tolist() == [True, False]
    assert types.size == 0


def test_bad_rows_are_rejected_with_reasons_and_kept(tiny_model_dir):
    batch = pa.table(
        {
            "query_id": ["a", "b", "c", "d", None, "f", "g"],
            "query": ["ok", None, "   ", "ok", "ok", "ok", "ok"],
            "doc_id": ["1", "2", "3", "4", "5", "6", "7"],
            "doc": ["fine doc", "x", "x", "", "x", None, "another fine doc"],
        }
    )
    out = TokenizeStage(str(tiny_model_dir), 64, 48)(batch)
    assert out.num_rows == batch.num_rows
    assert out[schema.REJECT_REASON].to_pylist() == [
        None,
        "null_query",
        "empty_query",
        "empty_doc",
        "null_id",
        "null_doc",
        None,
    ]
    lengths = out[schema.NUM_TOKENS].to_pylist()
    assert lengths[0] > 0 and lengths[6] > 0 and lengths[1:6] == [0] * 5
    assert out["query_id"].to_pylist() == batch["query_id"].to_pylist()


def test_non_string_text_is_rejected(tiny_model_dir):
    batch = pa.table({"query_id": ["a"], "query": [123], "doc_id": ["1"], "doc": ["x"]})
    out = TokenizeStage(str(tiny_model_dir), 64, 48)(batch)
    assert out[schema.REJECT_REASON].to_pylist() == ["not_string_query"]


def test_text_columns_can_be_dropped_after_tokenizing(tiny_model_dir):
    out = TokenizeStage(str(tiny_model_dir), 64, 48, drop_columns=("doc",))(table(PAIRS))
    assert "doc" not in out.column_names and "query" in out.column_names
    assert out[schema.INPUT_IDS].type == pa.list_(pa.int32())


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_rust_batch_path_equals_the_hf_tokenizer_call(kind, side, request):
    """The stage calls the Rust tokenizer directly (no BatchEncoding); its ids must be the
    HF call's for the same texts, limits and truncation side."""
    model_dir = request.getfixturevalue(kind)
    stage = TokenizeStage(str(model_dir), 64, 48)
    assert stage._raw is not None  # the fast path is the one under test
    stage.tokenizer.truncation_side = side
    hf = AutoTokenizer.from_pretrained(model_dir)
    hf.truncation_side = side
    texts = [q for q, _ in PAIRS] + [d for _, d in PAIRS]
    texts += [
        " ".join(d for _, d in PAIRS) * 5,  # longer than every limit below
        "  Paris\tis   the\ncapital  ",  # odd whitespace
        "Ünïcödé — naïve café 東京 🙂",
        f"text with {hf.sep_token} and {hf.cls_token} inside",  # special tokens as text
        "x",
    ]
    for limit in (1, 5, 17, 65):
        want = hf(texts, add_special_tokens=False, truncation=True, max_length=limit)
        assert stage._ids(texts, limit) == want["input_ids"], (limit, side)
    # The stage's private copy changed no setting of the HF tokenizer it came from.
    assert stage.tokenizer.backend_tokenizer.truncation is None


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_repeated_queries_tokenized_once_give_each_row_its_pair(kind, request):
    """Distinct queries are tokenized once per block; every row still gets its own pair."""
    model_dir = request.getfixturevalue(kind)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = [(PAIRS[i % 3][0], PAIRS[(i * 2 + 1) % 3][1] + f" {i}") for i in range(12)]
    out = TokenizeStage(str(model_dir), max_length=512, query_max_length=384)(table(pairs))
    expected = tok([q for q, _ in pairs], [d for _, d in pairs])
    assert out[schema.INPUT_IDS].to_pylist() == expected["input_ids"]


@pytest.mark.parametrize("kind", ["tiny_model_dir", "tiny_bert_dir"])
def test_cached_tokenizer_gives_the_same_rows_without_transformers(kind, request, tmp_path):
    """The first stage with a cache_dir writes what it takes from the HF tokenizer; a later
    one starts from that file (AutoTokenizer is never called) and tokenizes every row the
    same, truncation and token types included."""
    import transformers

    model_dir = str(request.getfixturevalue(kind))
    cache = tmp_path / "cache"
    long_doc = " ".join(d for _, d in PAIRS) * 4  # truncated at max_length 40
    batch = table([*PAIRS, (PAIRS[0][0], long_doc)])
    first = TokenizeStage(model_dir, 40, 12, cache_dir=str(cache))
    want = first(batch)
    assert len(list((cache / "tokenizers").glob("*.json"))) == 1

    def no_hf(*args, **kwargs):
        raise AssertionError("AutoTokenizer used although the cache holds this tokenizer")

    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.AutoTokenizer, "from_pretrained", no_hf)
    try:
        cached = TokenizeStage(model_dir, 40, 12, cache_dir=str(cache))
        got = cached(batch)
    finally:
        mp.undo()
    assert cached.tokenizer is None
    assert got.equals(want)
    assert got[schema.TRUNCATED].to_pylist()[-1] is True


def test_tokenizer_cache_misses_when_the_files_change_or_break(tiny_model_dir, tmp_path):
    """A changed tokenizer file is another key; a broken cache file is a miss that the next
    stage rewrites; trust_remote_code never uses the cache."""
    import json
    import shutil

    from rerank_ray.tokenizer_cache import TokenizerCache as _TokenizerCache

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    cache = tmp_path / "cache"
    TokenizeStage(str(model_dir), 40, 12, cache_dir=str(cache))
    entry = _TokenizerCache(str(model_dir), str(cache))
    assert entry.load() is not None
    entry.path.write_text("{not json")
    assert entry.load() is None
    TokenizeStage(str(model_dir), 40, 12, cache_dir=str(cache))
    assert entry.load() is not None
    damaged = {**entry.load(), "template": {"prefix": [0]}}  # valid JSON, missing fields
    entry.path.write_text(json.dumps(damaged))
    stage = TokenizeStage(str(model_dir), 40, 12, cache_dir=str(cache))
    assert stage.tokenizer is not None  # loaded through transformers, entry rewritten
    assert entry.load()["template"] != damaged["template"]
    config = model_dir / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"note": "edited",', 1))
    edited = _TokenizerCache(str(model_dir), str(cache)).key
    assert edited != entry.key
    (model_dir / "model.safetensors").write_bytes(b"weights are not part of the key")
    assert _TokenizerCache(str(model_dir), str(cache)).key == edited
    other = tmp_path / "other"
    TokenizeStage(str(model_dir), 40, 12, trust_remote_code=True, cache_dir=str(other))
    assert not other.exists()


def test_a_stage_from_the_cache_does_not_import_transformers(tiny_model_dir, tmp_path):
    """What the cache is for: a tokenize actor's start without importing transformers (and
    torch behind it), seconds per actor. Checked in a fresh process."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    TokenizeStage(str(tiny_model_dir), 40, 12, cache_dir=str(cache))
    code = (
        "import sys\n"
        "from rerank_ray.tokenize import TokenizeStage\n"
        f"s = TokenizeStage({str(tiny_model_dir)!r}, 40, 12, cache_dir={str(cache)!r})\n"
        "assert s.tokenizer is None\n"
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"

"""Synthetic reranking workload for the benchmark: lengths, texts, token ids, FLOPs.

No model hub and no network on the GPU machine, so the tokenizer is synthetic too: a
whitespace word-level vocabulary of 250,002 entries laid out like XLM-R's (``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3), one token per word, pairs as
``<s> query </s></s> doc </s>``. Texts are words ``w<id>``, so a text of n words is n tokens
and the length distribution below is exactly the token-length distribution.

Length distribution (per pair, before special tokens): query words uniform in [6, 20]
(mean 13); document words ``round(exp(N(4.49, 0.55)))`` clipped to [8, 700] (mean ~104). With
4 special tokens and truncation of the document to max_length 512 a pair averages ~121 tokens;
about 0.2% of pairs reach 512. Each query has ``docs_per_query`` documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 250_002
BOS, PAD, EOS, UNK = 0, 1, 2, 3
FIRST_WORD_ID = 4
SPECIAL_TOKENS_PER_PAIR = 4


@dataclass(frozen=True)
class Workload:
    """Pairs as word ids (token ids of the synthetic tokenizer) grouped by query."""

    query_words: list[np.ndarray]  # one per query
    doc_words: list[np.ndarray]  # one per pair
    query_of_pair: np.ndarray  # int64 [pairs]
    max_length: int

    @property
    def num_pairs(self) -> int:
        return len(self.doc_words)

    def tokenized(self) -> tuple[np.ndarray, np.ndarray]:
        """Packed token ids (int32) and offsets (int64) of every pair, truncated like the
        tokenize stage (the document is cut so the pair fits ``max_length``)."""
        q_len = np.array([len(self.query_words[q]) for q in self.query_of_pair])
        d_len = np.array([len(d) for d in self.doc_words])
        d_keep = np.minimum(d_len, self.max_length - SPECIAL_TOKENS_PER_PAIR - q_len)
        lengths = q_len + d_keep + SPECIAL_TOKENS_PER_PAIR
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        for i, (q, d) in enumerate(zip(self.query_of_pair, self.doc_words, strict=True)):
            qw = self.query_words[q]
            s = offsets[i]
            ids[s] = BOS
            ids[s + 1 : s + 1 + len(qw)] = qw
            ids[s + 1 + len(qw) : s + 3 + len(qw)] = EOS
            e = s + 3 + len(qw) + d_keep[i]
            ids[s + 3 + len(qw) : e] = d[: d_keep[i]]
            ids[e] = EOS
        return ids, offsets

    def texts(self, pairs: int | None = None) -> list[tuple[str, str]]:
        """The first ``pairs`` pairs as (query, doc) strings of ``w<id>`` words."""
        n = self.num_pairs if pairs is None else min(pairs, self.num_pairs)
        qtext = [" ".join(f"w{t}" for t in q) for q in self.query_words]
        return [
            (qtext[self.query_of_pair[i]], " ".join(f"w{t}" for t in self.doc_words[i]))
            for i in range(n)
        ]

    def write_parquet(self, folder: Path, pairs: int, shard_rows: int) -> None:
        """The first ``pairs`` pairs as Parquet files of ``shard_rows`` rows under ``folder``
        (query_id, query, doc_id, doc)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        texts = self.texts(pairs)
        for k, s0 in enumerate(range(0, len(texts), shard_rows)):
            part = texts[s0 : s0 + shard_rows]
            rows = range(s0, s0 + len(part))
            table = pa.table(
                {
                    "query_id": [f"q{self.query_of_pair[i]}" for i in rows],
                    "query": [q for q, _ in part],
                    "doc_id": [f"d{i}" for i in rows],
                    "doc": [d for _, d in part],
                }
            )
            pq.write_table(table, folder / f"pairs-{k:04d}.parquet")


def make_workload(
    pairs: int,
    *,
    docs_per_query: int = 100,
    max_length: int = 512,
    seed: int = 0,
    doc_tokens: tuple[int, int] | None = None,
) -> Workload:
    """``pairs`` synthetic pairs with the length distribution in the module docstring; with
    ``doc_tokens`` (low, high), documents of words uniform in that range (inclusive) instead:
    long documents."""
    rng = np.random.default_rng(seed)
    n_queries = -(-pairs // docs_per_query)
    vocab = VOCAB_SIZE - FIRST_WORD_ID
    queries = [
        rng.integers(0, vocab, rng.integers(6, 21)).astype(np.int32) + FIRST_WORD_ID
        for _ in range(n_queries)
    ]
    if doc_tokens is None:
        d_len = np.clip(np.round(np.exp(rng.normal(4.49, 0.55, pairs))), 8, 700).astype(np.int64)
    else:
        d_len = rng.integers(doc_tokens[0], doc_tokens[1] + 1, pairs)
    flat = (rng.integers(0, vocab, int(d_len.sum())) + FIRST_WORD_ID).astype(np.int32)
    docs = np.split(flat, np.cumsum(d_len)[:-1])
    return Workload(queries, docs, np.arange(pairs) // docs_per_query, max_length)


def save_synthetic_tokenizer(path: str) -> None:
    """Write a fast tokenizer for the ``w<id>`` vocabulary, loadable with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rerank_ray.tiny_model import xlmr_tokenizer

    vocab = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, VOCAB_SIZE - 1)})
    vocab["<mask>"] = VOCAB_SIZE - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = xlmr_tokenizer(tok, model_max_length=512)
    fast.save_pretrained(path)


def encoder_flops(
    lengths: np.ndarray,
    hidden: int,
    intermediate: int,
    layers: int,
    first_token_last_layer: bool = False,
) -> float:
    """Model FLOPs of an encoder forward on sequences of ``lengths`` (no padding counted):
    the four projections and the two attention matmuls of every layer. With
    ``first_token_last_layer`` (the scorer's default) the FLOPs it runs: the last layer's
    output projection, feed-forward block and attention queries for each sequence's first
    token only (its QKV projection still runs on every token)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    dense = 2.0 * (4 * hidden * hidden + 2 * hidden * intermediate) * lengths.sum()
    attention = 4.0 * hidden * (lengths**2).sum()
    total = layers * (dense + attention)
    if first_token_last_layer and layers:
        rest = lengths - 1
        total -= 2.0 * (hidden * hidden + 2 * hidden * intermediate) * rest.sum()
        total -= 4.0 * hidden * (lengths**2 - lengths).sum()
    return total

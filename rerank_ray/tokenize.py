"""CPU stage: (query, doc) rows -> token ids, the way FlagEmbedding's FlagReranker builds them.

FlagReranker tokenizes the query truncated to ``query_max_length`` and the document
truncated to ``max_length`` (both without special tokens), then joins them with the
model's special tokens, truncating only the document so the pair fits ``max_length``.
This stage does the same with the fast (Rust) tokenizer in batch: each distinct query text
once per block, each document once, and the pairs assembled from those ids and a template of
the model's special tokens in numpy (no per-row Python ``prepare_for_model``).

Rows that cannot be scored are not dropped: they keep flowing with a ``reject_reason``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema
from rerank_ray.config import ConfigError
from rerank_ray.pairs import (
    Chunking,
    PairTemplate,
    assemble_pairs,
    first_offsets,
    list_array,
    nested,
)
from rerank_ray.schema import RejectReason
from rerank_ray.tokenizer_cache import TokenizerCache, raw_rust_tokenizer

logger = logging.getLogger(__name__)


_REASONS = {
    schema.QUERY: (
        RejectReason.NULL_QUERY,
        RejectReason.NOT_STRING_QUERY,
        RejectReason.EMPTY_QUERY,
    ),
    schema.DOC: (RejectReason.NULL_DOC, RejectReason.NOT_STRING_DOC, RejectReason.EMPTY_DOC),
}


def classify_rows(table: pa.Table, texts: dict[str, list] | None = None) -> list[str | None]:
    """Reject reason per row (``None`` = scorable), in the order ids, query, doc.

    ``texts`` may hold the query and doc columns already converted to Python lists, so the
    caller, which needs them for tokenizing too, converts them only once.
    """
    if texts is None:
        texts = {c: table[c].to_pylist() for c in schema.TEXT_COLUMNS}
    null_id = pc.or_(pc.is_null(table[schema.QUERY_ID]), pc.is_null(table[schema.DOC_ID]))
    reasons: list[str | None] = [
        RejectReason.NULL_ID if bad else None for bad in null_id.to_pylist()
    ]
    for column in schema.TEXT_COLUMNS:
        null, not_string, empty = _REASONS[column]
        for i, value in enumerate(texts[column]):
            if reasons[i] is not None:
                continue
            if value is None:
                reasons[i] = null
            elif not isinstance(value, str):
                reasons[i] = not_string
            elif not value.strip():
                reasons[i] = empty
    return reasons


class TokenizeStage:
    """Ray Data stage (callable class): canonical pair rows -> rows with token ids.

    Adds ``input_ids`` (list<int32>), ``token_type_ids`` (list<int8>, only for models that
    use them), ``num_tokens``, ``truncated`` and ``reject_reason``; drops the text columns
    listed in ``drop_columns`` once they are tokenized. One output row per input row.
    With ``chunking`` (``long_docs: chunk``) a row's ``input_ids`` and ``token_type_ids`` are
    lists of windows (list<list<...>>, each window a whole pair; ``assemble_pairs`` with a
    ``Chunking``) and ``num_tokens`` is their total.
    """

    def __init__(
        self,
        model_dir: str,
        max_length: int,
        query_max_length: int,
        drop_columns: tuple[str, ...] = (),
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        chunking: Chunking | None = None,
    ) -> None:
        """``cache_dir``: where to keep what this stage takes from the HF tokenizer (the Rust
        tokenizer it calls, the pair template, the settings it reads), keyed by the model's
        tokenizer files and the transformers/tokenizers versions. A later actor with the same
        key starts from there without importing transformers (seconds per actor); the ids are
        the same by construction: the cached tokenizer is the HF one's own serialization.
        None: no cache. Never used with ``trust_remote_code``. ``chunking``: cut documents
        into windows (``long_docs: chunk``) instead of truncating them."""
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.drop_columns = tuple(drop_columns)
        self.chunking = chunking
        cache = (
            TokenizerCache(model_dir, cache_dir) if cache_dir and not trust_remote_code else None
        )
        saved = cache.load() if cache else None
        if saved is None or not self._from_cache(saved):
            self._from_hf(model_dir, trust_remote_code, cache)
        self._check_chunking()

    def _check_chunking(self) -> None:
        """With the model's own special tokens, the shortest window must exceed the overlap
        (the config checks this assuming ``config.PAIR_SPECIAL_TOKENS``)."""
        if self.chunking is None:
            return
        window = self.max_length - self.query_max_length - self.template.num_special
        if self.chunking.overlap >= window:
            raise ConfigError(
                f"`chunk_overlap` ({self.chunking.overlap}) must be smaller than the shortest "
                f"document window, {window} tokens (max_length {self.max_length} - "
                f"query_max_length {self.query_max_length} - this model's "
                f"{self.template.num_special} special tokens). Lower --chunk-overlap, raise "
                "--max-length or lower --query-max-length."
            )

    def _from_hf(self, model_dir: str, trust_remote_code: bool, cache) -> None:
        """Set up from the HF tokenizer, and write the cache entry (``cache`` not None)."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code
        )
        self.template = PairTemplate.from_tokenizer(self.tokenizer)
        self._raw = raw_rust_tokenizer(self.tokenizer)
        self.with_token_type_ids = "token_type_ids" in self.tokenizer.model_input_names
        self._settings = {}
        if cache is not None and self._raw is not None:
            cache.save(
                {
                    "tokenizer": self._raw.to_str(),
                    "template": asdict(self.template),
                    "with_token_type_ids": self.with_token_type_ids,
                    "settings": {
                        "split_special_tokens": self._split_special_tokens,
                        "truncation_side": self._truncation_side,
                    },
                }
            )

    def _from_cache(self, saved: dict) -> bool:
        """Set up from a cache entry; False (the caller loads the HF tokenizer, which rewrites
        the entry) if the entry does not hold what this stage needs."""
        try:
            from tokenizers import Tokenizer

            raw = Tokenizer.from_str(saved["tokenizer"])
            template = PairTemplate(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in saved["template"].items()}
            )
            settings = {
                k: saved["settings"][k] for k in ("split_special_tokens", "truncation_side")
            }
            with_types = bool(saved["with_token_type_ids"])
        except Exception as e:  # a damaged entry costs one HF load, never wrong ids
            logger.info("Tokenizer cache entry not usable (%s); loading the tokenizer.", e)
            return False
        self.tokenizer = None
        self._raw, self.template, self._settings = raw, template, settings
        self.with_token_type_ids = with_types
        return True

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = {c: batch[c].to_pylist() for c in schema.TEXT_COLUMNS}
        reasons = classify_rows(batch, texts)
        ok = [i for i, r in enumerate(reasons) if r is None]
        encoded = self.encode(
            [texts[schema.QUERY][i] for i in ok],
            [texts[schema.DOC][i] for i in ok],
        )
        ids, types, lengths, truncated = encoded[0], encoded[1], encoded[2], encoded[-1]
        n = batch.num_rows
        all_truncated = np.zeros(n, dtype=bool)
        all_truncated[ok] = truncated
        # Rejected rows carry empty token lists, so the flat arrays are the scorable rows'.
        all_lengths = np.zeros(n, dtype=np.int32)
        if self.chunking is None:
            all_lengths[ok] = lengths

            def column(flat: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
                return list_array(flat, all_lengths, value_type)

        else:  # lists of windows: windows per row over the windows' own lists
            windows = np.zeros(n, dtype=np.int64)
            windows[ok] = encoded[3]
            if len(ok):
                all_lengths[ok] = np.add.reduceat(lengths, first_offsets(encoded[3]))

            def column(flat: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
                return nested(list_array(flat, lengths, value_type), windows)

        out = batch.drop_columns([c for c in self.drop_columns if c in batch.column_names])
        out = out.append_column(schema.INPUT_IDS, column(ids, pa.int32()))
        if self.with_token_type_ids:
            out = out.append_column(schema.TOKEN_TYPE_IDS, column(types, pa.int8()))
        out = out.append_column(schema.NUM_TOKENS, pa.array(all_lengths, pa.int32()))
        out = out.append_column(schema.TRUNCATED, pa.array(all_truncated, pa.bool_()))
        out = out.append_column(schema.REJECT_REASON, pa.array(reasons, pa.string()))
        if out.num_rows != n:
            raise RuntimeError(f"Tokenize stage produced {out.num_rows} rows for {n} input rows.")
        return out

    def encode(self, queries: list[str], docs: list[str]) -> tuple[np.ndarray, ...]:
        """Tokenize pairs as FlagReranker does.

        Returns flat ids (int32), flat type ids (int8), per-pair lengths and truncated flags;
        with ``chunking``, ``assemble_pairs``' five arrays (per-window lengths, then windows
        per pair before the flags).
        """
        qmax, max_length = self.query_max_length, self.max_length
        with_types = self.with_token_type_ids
        if not queries:
            query_ids, query_of_row = [], np.zeros(0, np.int64)
        else:
            # A query comes with many candidates (often all of them in one block): each
            # distinct query text is tokenized once per block, and each pair takes its query's
            # ids by index.
            encoded = pa.array(queries, pa.string()).dictionary_encode()
            query_of_row = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            # One token past each limit tells whether the text was cut, at no extra cost.
            query_ids = self._ids(encoded.dictionary.to_pylist(), qmax + 1)
        if self.chunking is None:
            doc_limit = max_length + 1
        else:  # the document is tokenized once, as far as the widest row's windows reach (+1)
            shortest_query = min((min(len(q), qmax) for q in query_ids), default=qmax)
            widest = max_length - self.template.num_special - shortest_query
            doc_limit = int(self.chunking.coverage(widest)) + 1
        doc_ids = self._ids(docs, doc_limit) if docs else []
        return assemble_pairs(
            self.template,
            query_ids,
            query_of_row,
            doc_ids,
            max_length,
            qmax,
            with_types,
            self.chunking,
        )

    def _ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        """Token ids of each text, no special tokens, cut at ``max_length`` tokens."""
        if self._raw is None:  # a slow (Python) tokenizer
            return self.tokenizer(
                texts, add_special_tokens=False, truncation=True, max_length=max_length
            )["input_ids"]
        # What the HF call above does for a fast tokenizer, without building a BatchEncoding
        # of Python lists (ids, attention mask, type ids) per text, and through the Rust
        # tokenizer's batch call that skips offset tracking where it has one (measured in
        # bench/README.md, "Tokenize stage on one core"). Same truncation side and
        # special-token splitting as the HF call; padding is off (set once in
        # raw_rust_tokenizer).
        raw = self._raw
        split_special = self._split_special_tokens
        if raw.encode_special_tokens != split_special:
            raw.encode_special_tokens = split_special
        raw.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=self._truncation_side
        )
        encode = getattr(raw, "encode_batch_fast", raw.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    @property
    def _truncation_side(self) -> str:
        if self.tokenizer is None:
            return self._settings["truncation_side"]
        return getattr(self.tokenizer, "truncation_side", "right")

    @property
    def _split_special_tokens(self) -> bool:
        if self.tokenizer is None:
            return self._settings["split_special_tokens"]
        return bool(getattr(self.tokenizer, "split_special_tokens", False))

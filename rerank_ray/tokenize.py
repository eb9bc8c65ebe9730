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

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import schema
from rerank_ray.config import ConfigError
from rerank_ray.schema import RejectReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairTemplate:
    """Where a model's special tokens go around a (query, doc) pair.

    ``ids = prefix + query + middle + doc + suffix``; the type id of each part likewise.
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    middle_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    query_type: int
    doc_type: int

    @property
    def num_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> PairTemplate:
        """Read the template off the tokenizer itself.

        A known pair is encoded with and without special tokens; whatever surrounds the two
        texts' ids in the full encoding is the model's special tokens.
        """
        q_text, d_text = "query text", "document words"
        q = tokenizer(q_text, add_special_tokens=False)["input_ids"]
        d = tokenizer(d_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(q_text, d_text, return_token_type_ids=True)
        ids = list(full["input_ids"])
        types = list(full.get("token_type_ids") or [0] * len(ids))
        iq = _find(ids, q, 0)
        id_ = _find(ids, d, iq + len(q))
        if iq < 0 or id_ < 0:
            raise ValueError(
                f"Cannot find the pair layout of tokenizer {type(tokenizer).__name__}: "
                "its special tokens are not a fixed template around the two texts."
            )
        return cls(
            prefix=tuple(ids[:iq]),
            middle=tuple(ids[iq + len(q) : id_]),
            suffix=tuple(ids[id_ + len(d) :]),
            prefix_types=tuple(types[:iq]),
            middle_types=tuple(types[iq + len(q) : id_]),
            suffix_types=tuple(types[id_ + len(d) :]),
            query_type=types[iq],
            doc_type=types[id_],
        )


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


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


def _list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Arrow list array from flat values and per-row lengths (no per-element Python work)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def _nested(windows: pa.ListArray, per_row: np.ndarray) -> pa.ListArray:
    """Rows of ``per_row[i]`` consecutive windows each: list<list<...>>."""
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), windows)


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 values and int64 lengths of a list of int lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each run begins in the flat array of runs of ``lengths``."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def assemble_pairs(
    template: PairTemplate,
    query_ids: list[list[int]],
    query_of_row: np.ndarray,
    doc_ids: list[list[int]],
    max_length: int,
    query_max_length: int,
    with_types: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs from separately tokenized texts, FlagReranker's way, with no per-row Python.

    Row ``i`` pairs query ``query_of_row[i]`` of ``query_ids`` with document ``i`` of
    ``doc_ids`` (ids without special tokens). The query is cut to ``query_max_length``, the
    document so the pair fits ``max_length``, and ``template`` adds the special tokens.
    Returns flat ids (int32), flat type ids (int8; empty unless ``with_types``), per-pair
    lengths (int32) and truncated flags.
    """
    q_flat, q_len = _flatten(query_ids)
    d_flat, d_len = _flatten(doc_ids)
    row_q_len = q_len[query_of_row]
    q_keep = np.minimum(row_q_len, query_max_length)
    room = np.maximum(max_length - q_keep - template.num_special, 0)
    d_keep = np.minimum(d_len, room)
    truncated = (row_q_len > query_max_length) | (d_len > room)
    ids, types, lengths = _assemble(
        template,
        q_flat,
        _starts(q_len)[query_of_row],
        q_keep,
        d_flat,
        _starts(d_len),
        d_keep,
        with_types,
    )
    return ids, types, lengths, truncated


@dataclass(frozen=True)
class Chunking:
    """How ``long_docs: chunk`` cuts a document: windows overlapping by ``overlap`` tokens, at
    most ``max_chunks`` of them."""

    overlap: int
    max_chunks: int

    def coverage(self, room: np.ndarray | int) -> np.ndarray | int:
        """Document tokens that ``max_chunks`` windows of ``room`` tokens reach."""
        return room + (self.max_chunks - 1) * (room - self.overlap)


def window_spans(
    doc_lengths: np.ndarray, rooms: np.ndarray, chunking: Chunking
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each document into windows: row ``i`` has ``doc_lengths[i]`` tokens and room for
    ``rooms[i]`` document tokens per pair (each above ``chunking.overlap``).

    Window ``j`` of a row starts at ``j * (room - overlap)`` and holds up to ``room`` tokens;
    a row gets as many windows as reach its end, at most ``max_chunks``. A window after the
    first starts before ``length - overlap``, so it holds at least one token no earlier window
    has: no window is empty, and a document of no tokens gets one window (as when truncating).
    Returns per-window starts and lengths (int64, rows in order), windows per row, and
    whether a row's document reaches past its last window.
    """
    doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
    rooms = np.asarray(rooms, dtype=np.int64)
    step = rooms - chunking.overlap
    if np.any(step < 1):
        raise ValueError(f"every room must exceed the overlap {chunking.overlap}.")
    beyond = np.maximum(doc_lengths - rooms, 0)
    needed = 1 + -(-beyond // step)  # ceil division
    count = np.minimum(needed, chunking.max_chunks)
    row = np.repeat(np.arange(len(count)), count)
    index = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(_starts(count), count)
    starts = index * step[row]
    lengths = np.minimum(rooms[row], doc_lengths[row] - starts)
    return starts, lengths, count, needed > chunking.max_chunks


def assemble_windows(
    template: PairTemplate,
    query_ids: list[list[int]],
    query_of_row: np.ndarray,
    doc_ids: list[list[int]],
    max_length: int,
    query_max_length: int,
    with_types: bool,
    chunking: Chunking,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like ``assemble_pairs``, but each document is cut into windows (``window_spans``) and
    every window is paired with the row's query, framed as a pair of its length would be.

    Returns flat ids and type ids of all windows (rows in order, a row's windows in order),
    per-window lengths (int32), windows per row (int64) and truncated flags (the query was
    cut, or the document reaches past its last window).
    """
    q_flat, q_len = _flatten(query_ids)
    d_flat, d_len = _flatten(doc_ids)
    row_q_len = q_len[query_of_row]
    q_keep = np.minimum(row_q_len, query_max_length)
    room = max_length - q_keep - template.num_special
    starts, d_keep, count, doc_cut = window_spans(d_len, room, chunking)
    window_row = np.repeat(np.arange(len(count)), count)
    ids, types, lengths = _assemble(
        template,
        q_flat,
        _starts(q_len)[query_of_row][window_row],
        q_keep[window_row],
        d_flat,
        _starts(d_len)[window_row] + starts,
        d_keep,
        with_types,
    )
    return ids, types, lengths, count, (row_q_len > query_max_length) | doc_cut


def _assemble(
    t: PairTemplate,
    q_flat: np.ndarray,
    q_start: np.ndarray,
    q_keep: np.ndarray,
    d_flat: np.ndarray,
    d_start: np.ndarray,
    d_keep: np.ndarray,
    with_types: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair ``i``: ``q_keep[i]`` query ids from ``q_flat[q_start[i]:]`` and ``d_keep[i]``
    document ids from ``d_flat[d_start[i]:]``, framed by ``t``. Returns flat ids, flat type
    ids (empty unless ``with_types``) and lengths (int32)."""
    rows = len(q_keep)
    lengths = (t.num_special + q_keep + d_keep).astype(np.int32)
    # Every pair is five runs of one source array (special tokens, then all query ids, then
    # all document ids): prefix, query, middle, document, suffix. Each output position
    # reads source[run start + its place in the run], computed for all positions at once.
    specials = np.array(t.prefix + t.middle + t.suffix, dtype=np.int32)
    source = np.concatenate([specials, q_flat, d_flat])
    n_pre, n_mid, n_suf = len(t.prefix), len(t.middle), len(t.suffix)
    run_start = np.empty((rows, 5), dtype=np.int64)
    run_start[:, 0] = 0
    run_start[:, 1] = len(specials) + q_start
    run_start[:, 2] = n_pre
    run_start[:, 3] = len(specials) + len(q_flat) + d_start
    run_start[:, 4] = n_pre + n_mid
    run_len = np.empty((rows, 5), dtype=np.int64)
    run_len[:, 0], run_len[:, 1], run_len[:, 2] = n_pre, q_keep, n_mid
    run_len[:, 3], run_len[:, 4] = d_keep, n_suf
    run_len = run_len.ravel()
    total = int(run_len.sum())
    gather = np.repeat(run_start.ravel() - _starts(run_len), run_len)
    gather += np.arange(total, dtype=np.int64)
    ids = source[gather]
    types = np.zeros(0, dtype=np.int8)
    if with_types:
        type_source = np.concatenate(
            [
                np.array(t.prefix_types + t.middle_types + t.suffix_types, dtype=np.int8),
                np.full(len(q_flat), t.query_type, dtype=np.int8),
                np.full(len(d_flat), t.doc_type, dtype=np.int8),
            ]
        )
        types = type_source[gather]
    return ids, types, lengths


class TokenizeStage:
    """Ray Data stage (callable class): canonical pair rows -> rows with token ids.

    Adds ``input_ids`` (list<int32>), ``token_type_ids`` (list<int8>, only for models that
    use them), ``num_tokens``, ``truncated`` and ``reject_reason``; drops the text columns
    listed in ``drop_columns`` once they are tokenized. One output row per input row.
    With ``chunking`` (``long_docs: chunk``) a row's ``input_ids`` and ``token_type_ids`` are
    lists of windows (list<list<...>>, each window a whole pair; ``assemble_windows``) and
    ``num_tokens`` is their total.
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
            _TokenizerCache(model_dir, cache_dir) if cache_dir and not trust_remote_code else None
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
        self._raw = _raw_rust_tokenizer(self.tokenizer)
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
                return _list_array(flat, all_lengths, value_type)

        else:  # lists of windows: windows per row over the windows' own lists
            windows = np.zeros(n, dtype=np.int64)
            windows[ok] = encoded[3]
            if len(ok):
                all_lengths[ok] = np.add.reduceat(lengths, _starts(encoded[3]))

            def column(flat: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
                return _nested(_list_array(flat, lengths, value_type), windows)

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
        with ``chunking``, ``assemble_windows``' five arrays (per-window lengths, then windows
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
            doc_ids = self._ids(docs, max_length + 1) if docs else []
            return assemble_pairs(
                self.template, query_ids, query_of_row, doc_ids, max_length, qmax, with_types
            )
        # The document is tokenized once, as far as the widest row's windows reach (+1).
        shortest_query = min((min(len(q), qmax) for q in query_ids), default=qmax)
        widest = max_length - self.template.num_special - shortest_query
        doc_ids = self._ids(docs, int(self.chunking.coverage(widest)) + 1) if docs else []
        return assemble_windows(
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
        # _raw_rust_tokenizer).
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


_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".gguf", ".tflite",
)  # fmt: skip
_KEY_FILE_MAX_BYTES = 256 << 20  # larger files are weights or data, never a tokenizer's


class _TokenizerCache:
    """One JSON file per key: the model directory's non-weight files (names and bytes: the
    tokenizer files, its config; files over 256 MiB are left out), the transformers and
    tokenizers versions, and this format's version. Written atomically; an unreadable or
    foreign file is a miss."""

    FORMAT = 1

    def __init__(self, model_dir: str, cache_dir: str) -> None:
        from importlib import metadata

        def version(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "absent"

        h = hashlib.sha256()
        versions = [version(p) for p in ("transformers", "tokenizers")]
        h.update(f"rerank-ray tokenizer cache {self.FORMAT} {versions}".encode())
        for path in sorted(Path(model_dir).iterdir()):
            if (
                path.is_file()
                and not path.name.endswith(_WEIGHT_SUFFIXES)
                and path.stat().st_size <= _KEY_FILE_MAX_BYTES
            ):
                h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        self.key = h.hexdigest()
        self.path = Path(cache_dir) / "tokenizers" / f"{self.key}.json"

    def load(self) -> dict | None:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return None
        return saved

    def save(self, content: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": self.key, **content}))
            os.replace(tmp, self.path)  # readers see the old file or the whole new one
        except OSError as e:  # a read-only cache only costs start-up time
            logger.info("Tokenizer cache not written to %s: %s", self.path, e)


def _raw_rust_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a fast HF tokenizer, else None. A private copy, so
    changing its truncation settings leaves the HF tokenizer as it was."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    raw = Tokenizer.from_str(backend.to_str())
    raw.no_padding()  # a tokenizer.json may carry a padding setting; the HF call turns it off
    return raw

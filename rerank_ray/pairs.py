"""Pure: (query, document) token ids -> model inputs, the way FlagReranker builds pairs.

``PairTemplate`` reads where a model's special tokens and token types go; ``assemble_pairs``
joins each row's query and document ids with it (query cut to ``query_max_length``, then the
document cut so the pair fits ``max_length``), or, with a ``Chunking``, cuts a long document's
ids into overlapping windows (``window_spans``) framed the same way (``--long-docs chunk``).
numpy and pyarrow only: no tokenizer call, no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa


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


def list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """Arrow list array from flat values and per-row lengths (no per-element Python work)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def nested(windows: pa.ListArray, per_row: np.ndarray) -> pa.ListArray:
    """Rows of ``per_row[i]`` consecutive windows each: list<list<...>>."""
    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    np.cumsum(per_row, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), windows)


def _flatten(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 values and int64 lengths of a list of int lists."""
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def first_offsets(lengths: np.ndarray) -> np.ndarray:
    """Where each run begins in the flat array of runs of ``lengths``."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


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
    index = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(first_offsets(count), count)
    begins = index * step[row]
    lengths = np.minimum(rooms[row], doc_lengths[row] - begins)
    return begins, lengths, count, needed > chunking.max_chunks


def assemble_pairs(
    template: PairTemplate,
    query_ids: list[list[int]],
    query_of_row: np.ndarray,
    doc_ids: list[list[int]],
    max_length: int,
    query_max_length: int,
    with_types: bool,
    chunking: Chunking | None = None,
) -> tuple[np.ndarray, ...]:
    """Pairs from separately tokenized texts, FlagReranker's way, with no per-row Python.

    Row ``i`` pairs query ``query_of_row[i]`` of ``query_ids`` with document ``i`` of
    ``doc_ids`` (ids without special tokens). The query is cut to ``query_max_length``, the
    document so the pair fits ``max_length``, and ``template`` adds the special tokens.
    Returns flat ids (int32), flat type ids (int8; empty unless ``with_types``), per-pair
    lengths (int32) and truncated flags.

    With ``chunking``, each document is cut into windows (``window_spans``) instead, and
    every window is paired with the row's query, framed as a pair of its length would be.
    Returns five arrays then: flat ids and type ids of all windows (rows in order, a row's
    windows in order), per-window lengths (int32), windows per row (int64) and truncated
    flags (the query was cut, or the document reaches past its last window).
    """
    q_flat, q_len = _flatten(query_ids)
    d_flat, d_len = _flatten(doc_ids)
    row_q_len = q_len[query_of_row]
    q_keep = np.minimum(row_q_len, query_max_length)
    q_start = first_offsets(q_len)[query_of_row]
    d_start = first_offsets(d_len)
    room = max_length - q_keep - template.num_special
    if chunking is None:  # one pair per row: the document's head, as much as fits
        room = np.maximum(room, 0)
        d_keep = np.minimum(d_len, room)
        doc_cut = d_len > room
    else:  # one pair per window: the row's query and start repeat for each of its windows
        starts, d_keep, count, doc_cut = window_spans(d_len, room, chunking)
        window_row = np.repeat(np.arange(len(count)), count)
        q_start, q_keep = q_start[window_row], q_keep[window_row]
        d_start = d_start[window_row] + starts
    ids, types, lengths = _assemble(
        template, q_flat, q_start, q_keep, d_flat, d_start, d_keep, with_types
    )
    truncated = (row_q_len > query_max_length) | doc_cut
    if chunking is None:
        return ids, types, lengths, truncated
    return ids, types, lengths, count, truncated


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
    gather = np.repeat(run_start.ravel() - first_offsets(run_len), run_len)
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

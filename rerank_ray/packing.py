"""Pure helpers for the scorer: length sort/unsort and THE token-budget packer.

No Ray and no torch here, so these can be unit-tested alone. Every micro-batch the job (and
the benchmark) runs is cut by ``token_budget_spans``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MicroBatch(NamedTuple):
    """One forward pass worth of rows: packed token ids, Arrow offsets, optional type ids."""

    ids_flat: np.ndarray
    offsets: np.ndarray
    type_ids_flat: np.ndarray | None = None


def length_order(lengths: np.ndarray) -> np.ndarray:
    """Indices that sort rows longest first; stable, so equal lengths keep input order."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")


def inverse_order(order: np.ndarray) -> np.ndarray:
    """The permutation that puts rows sorted by ``order`` back into input order."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse


def micro_batch_cost(lengths: np.ndarray, padded: bool) -> int:
    """Tokens a forward pass holds: the sum of lengths, or rows x longest row when padded."""
    if len(lengths) == 0:
        return 0
    return int(len(lengths) * lengths.max()) if padded else int(lengths.sum())


def token_budget_spans(
    sorted_lengths: np.ndarray, budget: int, padded: bool
) -> list[tuple[int, int]]:
    """Cut length-sorted (longest first) rows into ``[start, end)`` micro-batches.

    With ``padded`` a micro-batch costs ``rows * longest``; without it (packed, padding-free
    attention) it costs the sum of the lengths. Each micro-batch stays within ``budget``
    tokens, except a single row longer than the budget, which goes alone.
    """
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    if len(lengths) > 1 and np.any(np.diff(lengths) > 0):
        raise ValueError("token_budget_spans needs lengths sorted longest first.")
    spans: list[tuple[int, int]] = []
    start, n = 0, len(lengths)
    while start < n:
        if padded:
            rows = max(1, budget // max(int(lengths[start]), 1))
            end = min(n, start + rows)
        else:
            cumulative = np.cumsum(lengths[start:])
            end = start + max(1, int(np.searchsorted(cumulative, budget, side="right")))
        spans.append((start, end))
        start = end
    return spans


def slice_rows(mb: MicroBatch, start: int, end: int) -> MicroBatch:
    """Rows ``[start, end)`` of a micro-batch, offsets rebased to 0."""
    lo, hi = int(mb.offsets[start]), int(mb.offsets[end])
    types = None if mb.type_ids_flat is None else mb.type_ids_flat[lo:hi]
    return MicroBatch(mb.ids_flat[lo:hi], mb.offsets[start : end + 1] - lo, types)

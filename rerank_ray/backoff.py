"""OOM back-off around a runner: score micro-batches, halving the token budget on CUDA OOM.

``score_microbatches`` runs a block's micro-batches and, on ``torch.cuda.OutOfMemoryError``
only, halves the budget, re-cuts the failed micro-batch with the one packer
(``packing.token_budget_spans``) and retries it; every row comes back exactly once, in order,
and the budget never goes below one ``max_length`` row (``BudgetExhaustedError`` then).

A runner is anything with ``score(ids_flat, offsets, type_ids_flat) -> float32[B]``; one that
also has ``submit(...)`` (returning an object with ``result()``) is driven one micro-batch
ahead so the host prepares the next while the device computes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

from rerank_ray.errors import RerankError
from rerank_ray.packing import MicroBatch, micro_batch_cost, slice_rows, token_budget_spans


class BudgetExhaustedError(RerankError, RuntimeError):
    """Out of memory even at the smallest budget that still holds one ``max_length`` row."""


class TokenBudget:
    """The current budget of one scorer; only ever shrinks (halving on OOM) down to ``floor``."""

    def __init__(self, value: int, floor: int) -> None:
        """``floor`` is the smallest useful budget: ``max_length``, one full row."""
        if value < floor:
            raise ValueError(
                f"token budget {value} is below the floor {floor} (max_length): a full "
                "(query, doc) pair would not fit. Raise the budget or lower max_length."
            )
        self.value = int(value)
        self.floor = int(floor)
        self.halvings = 0
        self._lock = threading.Lock()  # a scoring actor may run calls in several threads

    def halve(self, cause: BaseException | None = None) -> int:
        """Halve the budget, or raise ``BudgetExhaustedError`` when that would go below the floor."""
        with self._lock:
            if self.value // 2 < self.floor:
                raise BudgetExhaustedError(
                    f"CUDA ran out of memory at a token budget of {self.value}, and half of it "
                    f"is below the floor {self.floor} (max_length). Free GPU memory (other "
                    "processes, a smaller model or dtype) or lower --max-length."
                ) from cause
            self.value //= 2
            self.halvings += 1
            return self.value


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_microbatches(
    runner: Any,
    batches: Iterable[MicroBatch],
    budget: TokenBudget,
    *,
    padded: bool = False,
    oom_errors: tuple[type[BaseException], ...] | None = None,
) -> list[np.ndarray]:
    """Score every micro-batch; the list of results matches ``batches`` one to one.

    Rows within a micro-batch are sorted longest first (as the scorer packs them). A
    micro-batch over the current budget is first cut to it. On an OOM error
    (``torch.cuda.OutOfMemoryError`` by default; nothing else is caught) the budget is halved
    and the failed micro-batch is cut by the new budget and retried; the smaller budget then
    holds for later micro-batches and for the caller's later blocks (``budget.value``).
    """
    oom = oom_errors if oom_errors is not None else _oom_errors()
    submit = getattr(runner, "submit", None)
    batches = list(batches)
    if submit is None:
        return [_score_sync(runner, mb, budget, padded, oom) for mb in batches]
    parts_out: list[list[np.ndarray]] = [[] for _ in batches]
    pending: deque = deque()
    for i, mb in enumerate(batches):
        for part in _parts(mb, budget.value, padded):
            try:
                handle = submit(*part)
            except oom as exc:
                while pending:  # keep order: finish what is in flight before the retry
                    j, done = pending.popleft()
                    parts_out[j].append(done.result())
                parts_out[i].append(_after_oom(runner, part, budget, padded, oom, exc))
                continue
            pending.append((i, handle))
            if len(pending) > 1:  # one micro-batch queued ahead of the one being read back
                j, done = pending.popleft()
                parts_out[j].append(done.result())
    while pending:
        j, done = pending.popleft()
        parts_out[j].append(done.result())
    return [np.concatenate(p) for p in parts_out]


def _parts(mb: MicroBatch, budget: int, padded: bool) -> list[MicroBatch]:
    lengths = np.diff(mb.offsets)
    if len(lengths) <= 1 or micro_batch_cost(lengths, padded) <= budget:
        return [mb]
    return [slice_rows(mb, s, e) for s, e in token_budget_spans(lengths, budget, padded)]


def _score_sync(runner, mb: MicroBatch, budget, padded, oom) -> np.ndarray:
    parts = _parts(mb, budget.value, padded)
    if len(parts) > 1:
        return np.concatenate([_score_sync(runner, p, budget, padded, oom) for p in parts])
    try:
        return runner.score(*mb)
    except oom as exc:
        return _after_oom(runner, mb, budget, padded, oom, exc)


def _after_oom(runner, mb: MicroBatch, budget, padded, oom, exc) -> np.ndarray:
    """``mb`` fit the budget and still ran out of memory: halve until it splits, retry."""
    _release_cached_memory()
    lengths = np.diff(mb.offsets)
    budget.halve(exc)
    while len(lengths) > 1 and micro_batch_cost(lengths, padded) <= budget.value:
        budget.halve(exc)
    return _score_sync(runner, mb, budget, padded, oom)

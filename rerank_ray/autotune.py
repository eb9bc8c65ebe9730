"""Token budget of a forward pass: autotuned to the GPU's free memory, halved on CUDA OOM.

The budget caps the tokens one forward pass holds (padded tokens for a padded runner, real
tokens for the padding-free one). ``autotune_token_budget`` finds the largest budget that fits
the free memory at actor start, probing with full ``max_length`` sequences (the worst case),
and caches it per (GPU name, model, dtype, max_length). ``score_microbatches`` runs a block's
micro-batches and, on ``torch.cuda.OutOfMemoryError`` only, halves the budget, splits the
failed micro-batch and retries it; every row comes back exactly once, in order.

A runner is anything with ``score(ids_flat, offsets, type_ids_flat) -> float32[B]``; one that
also has ``submit(...)`` (returning an object with ``result()``) is driven one micro-batch
ahead so the host prepares the next while the device computes.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Throughput is flat beyond ~32k tokens per forward on an H200 (bench/results), and smaller
# micro-batches keep one queued ahead of the one being read back within a block.
DEFAULT_MAX_BUDGET = 65_536
DEFAULT_CACHE = Path.home() / ".cache" / "rerank-ray" / "token_budget.json"


class BudgetExhaustedError(RuntimeError):
    """Out of memory even at the smallest budget that still holds one ``max_length`` row."""


class MicroBatch(NamedTuple):
    """One forward pass worth of rows: packed token ids, Arrow offsets, optional type ids."""

    ids_flat: np.ndarray
    offsets: np.ndarray
    type_ids_flat: np.ndarray | None = None


def micro_batch_cost(lengths: np.ndarray, padded: bool) -> int:
    """Tokens a forward pass holds: the sum of lengths, or rows x longest row when padded."""
    if len(lengths) == 0:
        return 0
    return int(len(lengths) * lengths.max()) if padded else int(lengths.sum())


def cut_by_budget(lengths: np.ndarray, budget: int, padded: bool) -> list[tuple[int, int]]:
    """Greedy consecutive row ranges ``[start, end)`` whose cost stays within ``budget``.

    Rows should already be sorted by length (ascending) so padded batches waste little. A row
    longer than the budget still gets a range of its own (the caller's floor prevents that).
    """
    ranges: list[tuple[int, int]] = []
    start, used, longest = 0, 0, 0
    for i, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        new_longest = max(longest, n)
        cost = (i - start + 1) * new_longest if padded else used + n
        if i > start and cost > budget:
            ranges.append((start, i))
            start, used, new_longest = i, 0, n
        used += n
        longest = new_longest
    if start < len(lengths):
        ranges.append((start, len(lengths)))
    return ranges


def slice_rows(mb: MicroBatch, start: int, end: int) -> MicroBatch:
    """Rows ``[start, end)`` of a micro-batch, offsets rebased to 0."""
    lo, hi = int(mb.offsets[start]), int(mb.offsets[end])
    types = None if mb.type_ids_flat is None else mb.type_ids_flat[lo:hi]
    return MicroBatch(mb.ids_flat[lo:hi], mb.offsets[start : end + 1] - lo, types)


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
        self._lock = threading.Lock()  # a scoring actor may run calls in several threads

    def halve(self, cause: BaseException | None = None) -> int:
        """Halve the budget, or raise ``BudgetExhaustedError`` when that would go below the floor."""
        with self._lock:
            if self.value // 2 < self.floor:
                raise BudgetExhaustedError(
                    f"CUDA ran out of memory at a token budget of {self.value}, and half of it "
                    f"is below the floor {self.floor} (max_length). Free GPU memory (other "
                    "processes, a smaller model or dtype) or lower max_length."
                ) from cause
            self.value //= 2
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

    A micro-batch over the current budget is first cut to it. On an OOM error
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
    return [slice_rows(mb, s, e) for s, e in cut_by_budget(lengths, budget, padded)]


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


# --- autotune --------------------------------------------------------------------------------
def budget_cache_key(gpu_name: str, model: str, dtype: str, max_length: int) -> str:
    """Cache key of an autotuned budget."""
    return f"{gpu_name}|{model}|{dtype}|{max_length}"


def read_cached_budget(path: Path, key: str) -> int | None:
    """The cached budget for ``key``, or None (no file, no entry, unreadable file)."""
    try:
        value = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def write_cached_budget(path: Path, key: str, value: int) -> None:
    """Store ``value`` under ``key``, atomically (write to a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    entries[key] = int(value)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _probe_batch(budget: int, max_length: int, token_id: int) -> MicroBatch:
    rows = budget // max_length
    offsets = np.arange(rows + 1, dtype=np.int64) * max_length
    return MicroBatch(np.full(rows * max_length, token_id, dtype=np.int32), offsets, None)


def _peak_bytes(runner, mb: MicroBatch, device) -> int:
    import torch

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.score(*mb)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def autotune_token_budget(
    runner: Any,
    *,
    model: str,
    dtype: str,
    max_length: int,
    device: Any = None,
    cache_path: Path | None = DEFAULT_CACHE,
    headroom: float = 0.85,
    max_budget: int = DEFAULT_MAX_BUDGET,
    probe_token_id: int = 5,
    concurrent: int = 1,
) -> int:
    """Largest token budget (a multiple of ``max_length``, at most ``max_budget``) whose forward
    pass fits in ``headroom`` of the GPU memory free now; with ``concurrent`` forward passes in
    flight at once (threads of one actor), that many must fit together.

    Activation memory grows linearly with the budget: two probes of full ``max_length`` rows
    give its slope and intercept, the free memory gives the budget, and one run at that budget
    confirms it (halving on OOM). ``cache_path=None`` skips the cache.
    """
    import torch

    device = torch.device(device if device is not None else "cuda")
    if device.index is None:  # the memory queries below need an explicit index
        device = torch.device("cuda", torch.cuda.current_device())
    if concurrent < 1:
        raise ValueError(f"concurrent must be at least 1, got {concurrent}.")
    key = budget_cache_key(torch.cuda.get_device_name(device), model, dtype, max_length)
    if concurrent > 1:
        key += f"|x{concurrent}"
    if cache_path is not None and (cached := read_cached_budget(cache_path, key)) is not None:
        return cached
    if max_budget < max_length:
        raise ValueError(f"max_budget {max_budget} is below max_length {max_length}.")

    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    # A per-process cap (set_per_process_memory_fraction) is not visible in mem_get_info.
    cap = torch.cuda.get_per_process_memory_fraction(device) * total
    free = min(free, cap - torch.cuda.memory_reserved(device))
    small, large = 4 * max_length, 8 * max_length
    budget = TokenBudget(max_budget // max_length * max_length, max_length)
    try:
        p_small = _peak_bytes(runner, _probe_batch(small, max_length, probe_token_id), device)
        p_large = _peak_bytes(runner, _probe_batch(large, max_length, probe_token_id), device)
    except torch.cuda.OutOfMemoryError as exc:
        raise BudgetExhaustedError(
            f"CUDA ran out of memory probing {large} tokens of max_length {max_length} rows "
            "on a fresh actor; free GPU memory or lower max_length."
        ) from exc
    per_token = max((p_large - p_small) / (large - small), 1.0)
    fixed = max(p_small - per_token * small, 0.0)
    fits = int((free * headroom / concurrent - fixed) / per_token) // max_length * max_length
    budget.value = max(min(fits, budget.value), max_length)
    while True:  # confirm at full size; the estimate can miss fragmentation or caps
        try:
            _peak_bytes(runner, _probe_batch(budget.value, max_length, probe_token_id), device)
            break
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            budget.halve(exc)
            budget.value = budget.value // max_length * max_length
    torch.cuda.empty_cache()
    if cache_path is not None:
        write_cached_budget(cache_path, key, budget.value)
    return budget.value


def split_rows(lengths: Sequence[int], budget: int, padded: bool = False) -> list[np.ndarray]:
    """Row indices of micro-batches for rows of ``lengths``, sorted by length first.

    Convenience for callers without their own packing: returns index arrays into the
    original order; ``np.concatenate`` of them is a permutation of ``range(len(lengths))``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    return [order[s:e] for s, e in cut_by_budget(lengths[order], budget, padded)]

"""The largest token budget a scoring actor's GPU holds, probed at actor start and cached.

``autotune_token_budget`` finds the largest budget that fits the free memory, probing with full
``max_length`` sequences (the worst case), and caches it per (GPU name, model, dtype,
max_length, concurrent calls) in ``token_budget.json`` under the cache root
(``storage.default_cache_dir()`` or ``--model-cache-dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rerank_ray import json_cache
from rerank_ray.backoff import BudgetExhaustedError, TokenBudget
from rerank_ray.packing import MicroBatch

# Throughput is flat beyond ~32k tokens per forward on the GPUs measured (bench/README.md),
# and smaller micro-batches keep one queued ahead of the one being read back within a block.
DEFAULT_MAX_BUDGET = 65_536
CACHE_FILE = "token_budget.json"


def budget_cache_key(gpu_name: str, model: str, dtype: str, max_length: int) -> str:
    """Cache key of an autotuned budget."""
    return f"{gpu_name}|{model}|{dtype}|{max_length}"


def read_cached_budget(path: Path, key: str) -> int | None:
    """The cached budget for ``key``, or None (no file, no entry, unreadable file)."""
    value = json_cache.read_entry(path, key)
    return int(value) if isinstance(value, int) and value > 0 else None


def write_cached_budget(path: Path, key: str, value: int) -> None:
    """Store ``value`` under ``key``, atomically (write to a temporary file, then rename)."""
    json_cache.write_entry(path, key, int(value))


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
    cache_path: Path | None = None,
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
    confirms it (halving on OOM). ``cache_path``: the cache file (``CACHE_FILE`` under the
    cache root); None skips the cache.
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

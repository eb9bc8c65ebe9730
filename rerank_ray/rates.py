"""The stages' measured rates per model, remembered between runs to size the tokenize pool
and the blocks.

After a committed run, ``remember_rates`` keeps what one busy scoring actor and one busy
tokenize actor did per second (the run's ``metrics.stages``) in ``stage_rates.json`` under the
cache root (``storage.default_cache_dir()`` or ``--model-cache-dir``), keyed by what changes
those rates (``rates_key``). The next run of the same key starts its tokenize pool at the size
they call for (``cluster.tokenize_pool_start``), and cuts blocks as large as a fast scorer
needs (``block_rows``). Deleting the file forgets them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rerank_ray import json_cache, storage
from rerank_ray.config import JobConfig

RATES_FILE = "stage_rates.json"
DEFAULT_BLOCK_ROWS = 2048
MAX_BLOCK_ROWS = 8192
# Each block costs a scoring actor a hand-off between Ray Data's actors besides its own work
# (measured in bench/README.md): blocks of at least this much scoring keep that small.
BLOCK_SCORING_S = 0.1
# At least this many blocks per tokenize actor the pool starts with, so a small input still
# spreads over every actor.
BLOCKS_PER_TOKENIZER = 4
# Rates are remembered only from runs whose stages each made at least this many calls: a
# shorter run (the demo, a smoke test) measures mostly its first calls, which pay one-time
# costs, and would leave rates the next large run is then sized by.
MIN_CALLS = 8

log = logging.getLogger("rerank_ray")


@dataclass(frozen=True)
class StageRates:
    """Rows one busy actor of each stage handles per second. A row is one (query, doc) pair,
    or one document's windows with ``long_docs: chunk``; both stages count the same rows."""

    score_rows_per_s: float  # per scoring actor, over the seconds it was in a call
    tokenize_rows_per_s: float  # per tokenize actor, likewise

    @classmethod
    def from_entry(cls, entry: Any) -> StageRates | None:
        """The rates a cache entry holds, or None when it is not two positive numbers."""
        if not isinstance(entry, dict):
            return None
        values = [entry.get("score_rows_per_s"), entry.get("tokenize_rows_per_s")]
        if not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in values
        ):
            return None
        return cls(float(values[0]), float(values[1]))

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None) -> StageRates | None:
        """The rates a run measured (the manifest's ``metrics``); None when it has no metrics
        or a stage made fewer than ``MIN_CALLS`` calls. The scoring rate is per busy second,
        not over the run's span: a scorer starved of tokens still shows what it can do."""
        stages = (metrics or {}).get("stages") or {}
        score, tokenize = (stages.get(s) or {} for s in ("score", "tokenize"))
        if min(score.get("calls") or 0, tokenize.get("calls") or 0) < MIN_CALLS:
            return None
        return cls.from_entry(
            {
                "score_rows_per_s": score.get("rows_per_busy_s"),
                "tokenize_rows_per_s": tokenize.get("rows_per_busy_s"),
            }
        )


def rates_key(cfg: JobConfig, device: str) -> str:
    """The cache key of ``cfg``'s rates on ``device`` (a GPU type, ``cuda`` or ``cpu``): the
    model as given, precision, dtype, max_length and long_docs."""
    return f"{cfg.model}|{cfg.precision}|{cfg.dtype}|{device}|{cfg.max_length}|{cfg.long_docs}"


def cache_path(cfg: JobConfig) -> Path:
    """The rates file under ``cfg``'s cache root."""
    return Path(cfg.model_cache_dir or storage.default_cache_dir()) / RATES_FILE


def read_rates(path: Path, key: str) -> StageRates | None:
    """The rates stored under ``key``, or None (no file, no entry, unreadable file)."""
    return StageRates.from_entry(json_cache.read_entry(path, key))


def remember_rates(path: Path, key: str, metrics: dict[str, Any] | None) -> StageRates | None:
    """Store the rates ``metrics`` measured under ``key``; returns them, or None when there
    were none or the file could not be written (logged: a cache never fails a run)."""
    rates = StageRates.from_metrics(metrics)
    if rates is None:
        log.debug("no stage rates to remember for %s: a stage made < %d calls", key, MIN_CALLS)
        return None
    try:
        json_cache.write_entry(path, key, asdict(rates))
    except OSError as err:
        log.warning("could not remember the stage rates in %s: %s", path, err)
        return None
    log.debug("remembered the stage rates for %s in %s: %s", key, path, rates)
    return rates


def block_rows(
    pinned: int | None, measured: StageRates | None, rows: int | None, tokenizers: int
) -> int:
    """Rows per block handed to each stage: ``pinned`` (``--batch-rows``) when given; else
    ``DEFAULT_BLOCK_ROWS``, raised (by powers of two, up to ``MAX_BLOCK_ROWS``) when an earlier
    run ``measured`` a scoring actor fast enough to finish such a block in under
    ``BLOCK_SCORING_S``, as long as the input's ``rows`` still make ``BLOCKS_PER_TOKENIZER``
    blocks for each of the ``tokenizers`` the pool starts with."""
    if pinned is not None:
        return pinned
    size = DEFAULT_BLOCK_ROWS
    if measured is None:
        return size
    wanted = measured.score_rows_per_s * BLOCK_SCORING_S
    limit = rows / (BLOCKS_PER_TOKENIZER * max(tokenizers, 1)) if rows else math.inf
    while size < wanted and size * 2 <= min(MAX_BLOCK_ROWS, limit):
        size *= 2
    return size

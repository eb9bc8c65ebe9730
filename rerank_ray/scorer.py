"""Actor stage: token ids -> relevance scores, one model replica per actor.

Within each block, rows are sorted by length, cut into micro-batches by the one packer
(``packing.token_budget_spans``), scored by the runner (``runners.build_runner``) with OOM
back-off (``backoff``), and put back in input order. Rejected rows pass through with null
scores. With ``long_docs: chunk`` a row holds several windows: each is packed and scored as
a sequence of its own, and the row's score folds its windows' (``fold_windows``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import packing, schema
from rerank_ray.backoff import TokenBudget, score_microbatches
from rerank_ray.config import CHUNK_AGGREGATES
from rerank_ray.packing import MicroBatch
from rerank_ray.runners import RunnerOptions, build_runner

CPU_TOKEN_BUDGET = 8192
logger = logging.getLogger(__name__)


class ScoreStage:
    """Ray Data stage (callable class): rows with ``input_ids`` -> rows with scores.

    Loads the model once in ``__init__``; ``__call__`` does no I/O. Drops the token columns
    and adds ``score`` (float32 raw logit, as ``FlagReranker.compute_score``) and
    ``score_norm`` (its sigmoid); with ``chunk_aggregate`` also ``num_chunks`` and
    ``best_chunk`` (int32).
    """

    def __init__(
        self,
        model_dir: str,
        options: RunnerOptions | None = None,
        *,
        max_length: int = 512,
        token_budget: int | None = None,
        concurrent_calls: int = 1,
        cache_dir: str | None = None,
        chunk_aggregate: str | None = None,
    ) -> None:
        """``options``: how to score (device, dtype, kernels; ``RunnerOptions``).
        ``token_budget``: tokens per forward pass; None autotunes it on a GPU (cached under
        ``cache_dir``) and uses ``CPU_TOKEN_BUDGET`` on CPU. ``concurrent_calls``: how many
        ``__call__`` may run at once in threads (the job's ``scorer_calls``); the autotuned
        budget leaves memory for that many forward passes. ``chunk_aggregate``: None when
        each row is one pair (``long_docs: truncate``); else rows hold lists of windows (the
        tokenize stage's ``chunking``), and a row's score is the max, first or mean of its
        windows' scores."""
        from rerank_ray import autotune, storage

        if chunk_aggregate is not None and chunk_aggregate not in CHUNK_AGGREGATES:
            raise ValueError(
                f"chunk_aggregate is {chunk_aggregate!r}; choose one of {CHUNK_AGGREGATES}."
            )
        self.chunk_aggregate = chunk_aggregate

        built = build_runner(model_dir, options or RunnerOptions())
        self.runner = built.runner
        self.device, self.dtype, self.load_path = built.device, built.dtype, built.load_path
        t0 = time.perf_counter()
        if token_budget is None and self.device.type == "cuda":
            cache = Path(cache_dir or storage.default_cache_dir()) / autotune.CACHE_FILE
            token_budget = autotune.autotune_token_budget(
                self.runner,
                model=str(model_dir),
                dtype=str(self.dtype).removeprefix("torch."),
                max_length=max_length,
                concurrent=concurrent_calls,
                cache_path=cache,
            )
        # Halved on CUDA OOM (backoff.score_microbatches), never below one full pair.
        self.budget = TokenBudget(
            token_budget or max(CPU_TOKEN_BUDGET, max_length), floor=max_length
        )
        # Where the actor's set-up time went (the trace reports it).
        self.setup_seconds = {**built.seconds, "autotune": round(time.perf_counter() - t0, 2)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ok = np.flatnonzero(pc.is_null(batch[schema.REJECT_REASON]).to_numpy(zero_copy_only=False))
        scores = np.full(n, np.nan, dtype=np.float32)
        chunked = self.chunk_aggregate is not None
        num_chunks, best_chunk = np.zeros(n, np.int32), np.zeros(n, np.int32)
        if len(ok) and chunked:
            scores[ok], num_chunks[ok], best_chunk[ok] = self.score_windows(batch, ok)
        elif len(ok):
            scores[ok] = self.score_rows(batch, ok)
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        norm = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
        out = batch.drop_columns([c for c in schema.TOKEN_COLUMNS if c in batch.column_names])
        out = out.append_column(schema.SCORE, pa.array(scores, pa.float32(), mask=~valid))
        out = out.append_column(
            schema.SCORE_NORM, pa.array(norm.astype(np.float32), pa.float32(), mask=~valid)
        )
        if chunked:
            out = out.append_column(schema.NUM_CHUNKS, pa.array(num_chunks, mask=~valid))
            out = out.append_column(schema.BEST_CHUNK, pa.array(best_chunk, mask=~valid))
        if out.num_rows != n:
            raise RuntimeError(f"Score stage produced {out.num_rows} rows for {n} input rows.")
        return out

    def score_rows(self, batch: pa.Table, rows: np.ndarray) -> np.ndarray:
        """Scores of ``rows`` (indices into ``batch``), in the order given."""
        ids, types = _token_lists(batch)
        if pa.types.is_list(ids.type.value_type):
            raise ValueError(
                f"`{schema.INPUT_IDS}` holds lists of windows ({ids.type}) but chunk_aggregate "
                "is not set: give the score stage the same long_docs setting."
            )
        lengths = batch[schema.NUM_TOKENS].to_numpy()[rows]
        return self._score_sequences(ids, types, rows, lengths)

    def score_windows(
        self, batch: pa.Table, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score, window count and best window of ``rows`` whose token columns hold lists of
        windows: every window of these rows is one sequence for the packer."""
        ids, types = _token_lists(batch)
        if not pa.types.is_list(ids.type.value_type):
            raise ValueError(
                f"chunk_aggregate is set but `{schema.INPUT_IDS}` is {ids.type}, not a list of "
                "windows: give the tokenize stage the same long_docs setting."
            )
        take = pa.array(rows)
        row_windows = ids.take(take)
        per_row = row_windows.value_lengths().to_numpy()
        windows = row_windows.flatten()
        window_types = types.take(take).flatten() if types is not None else None
        lengths = windows.value_lengths().to_numpy()
        scores = self._score_sequences(windows, window_types, np.arange(len(windows)), lengths)
        return fold_windows(scores, per_row, self.chunk_aggregate)

    def _score_sequences(
        self, ids: pa.ListArray, types: pa.ListArray | None, rows: np.ndarray, lengths: np.ndarray
    ) -> np.ndarray:
        """Scores of the sequences ``ids[rows]`` (``lengths`` tokens each), in that order."""
        order = packing.length_order(lengths)
        sorted_rows = rows[order]
        spans = packing.token_budget_spans(
            lengths[order], self.budget.value, padded=self.runner.padded
        )
        micro_batches = []
        for start, end in spans:
            take = pa.array(sorted_rows[start:end])
            part = ids.take(take)
            flat = part.flatten().to_numpy()
            offsets = part.offsets.to_numpy().astype(np.int64)
            offsets -= offsets[0]
            type_flat = types.take(take).flatten().to_numpy() if types is not None else None
            micro_batches.append(MicroBatch(flat, offsets, type_flat))
        sorted_scores = np.concatenate(
            score_microbatches(self.runner, micro_batches, self.budget, padded=self.runner.padded)
        )
        return sorted_scores[packing.inverse_order(order)]


def fold_windows(
    scores: np.ndarray, windows_per_row: np.ndarray, aggregate: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One score per row from its windows' ``scores`` (rows' windows consecutive, each row at
    least one): the ``max``, the ``first`` or the ``mean`` (summed in float64). Returns the
    scores (float32), the windows per row and the index of each row's highest window (int32;
    the first of equal ones)."""
    per_row = np.asarray(windows_per_row, dtype=np.int64)
    if np.any(per_row < 1) or per_row.sum() != len(scores):
        raise ValueError(
            f"{len(scores)} window scores do not split into rows of {per_row.tolist()} windows "
            "(each row needs at least one)."
        )
    starts = np.zeros(len(per_row), dtype=np.int64)
    np.cumsum(per_row[:-1], out=starts[1:])
    if aggregate == "max":
        folded = np.maximum.reduceat(scores, starts)
    elif aggregate == "first":
        folded = scores[starts]
    elif aggregate == "mean":
        folded = np.add.reduceat(scores.astype(np.float64), starts) / per_row
    else:
        raise ValueError(f"aggregate is {aggregate!r}; choose one of {CHUNK_AGGREGATES}.")
    best = [int(np.argmax(row)) for row in np.split(scores, starts[1:])]
    return (
        folded.astype(np.float32),
        per_row.astype(np.int32),
        np.asarray(best, dtype=np.int32),
    )


def _token_lists(batch: pa.Table) -> tuple[pa.ListArray, pa.ListArray | None]:
    """The batch's ids and (if present) type ids, each as one list array."""
    ids = _combine(batch[schema.INPUT_IDS])
    if schema.TOKEN_TYPE_IDS not in batch.column_names:
        return ids, None
    return ids, _combine(batch[schema.TOKEN_TYPE_IDS])


def _combine(column: pa.ChunkedArray) -> pa.ListArray:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

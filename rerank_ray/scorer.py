"""Actor stage: token ids -> relevance scores, one model replica per actor.

Within each block, rows are sorted by length, cut into micro-batches by the one packer
(``packing.token_budget_spans``), scored by the runner (``runners.build_runner``) with OOM
back-off (``backoff``), and put back in input order. Rejected rows pass through with null
scores.
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
from rerank_ray.packing import MicroBatch
from rerank_ray.runners import RunnerOptions, build_runner

CPU_TOKEN_BUDGET = 8192
logger = logging.getLogger(__name__)


class ScoreStage:
    """Ray Data stage (callable class): rows with ``input_ids`` -> rows with scores.

    Loads the model once in ``__init__``; ``__call__`` does no I/O. Drops the token columns
    and adds ``score`` (float32 raw logit, as ``FlagReranker.compute_score``) and
    ``score_norm`` (its sigmoid).
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
    ) -> None:
        """``options``: how to score (device, dtype, kernels; ``RunnerOptions``).
        ``token_budget``: tokens per forward pass; None autotunes it on a GPU (cached under
        ``cache_dir``) and uses ``CPU_TOKEN_BUDGET`` on CPU. ``concurrent_calls``: how many
        ``__call__`` may run at once in threads (the job's ``scorer_calls``); the autotuned
        budget leaves memory for that many forward passes."""
        from rerank_ray import autotune, storage

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
        if len(ok):
            scores[ok] = self.score_rows(batch, ok)
        valid = np.zeros(n, dtype=bool)
        valid[ok] = True
        norm = 1.0 / (1.0 + np.exp(-scores.astype(np.float64)))
        out = batch.drop_columns([c for c in schema.TOKEN_COLUMNS if c in batch.column_names])
        out = out.append_column(schema.SCORE, pa.array(scores, pa.float32(), mask=~valid))
        out = out.append_column(
            schema.SCORE_NORM, pa.array(norm.astype(np.float32), pa.float32(), mask=~valid)
        )
        if out.num_rows != n:
            raise RuntimeError(f"Score stage produced {out.num_rows} rows for {n} input rows.")
        return out

    def score_rows(self, batch: pa.Table, rows: np.ndarray) -> np.ndarray:
        """Scores of ``rows`` (indices into ``batch``), in the order given."""
        lengths = batch[schema.NUM_TOKENS].to_numpy()[rows]
        order = packing.length_order(lengths)
        sorted_rows = rows[order]
        ids = _combine(batch[schema.INPUT_IDS])
        types = (
            _combine(batch[schema.TOKEN_TYPE_IDS])
            if schema.TOKEN_TYPE_IDS in batch.column_names
            else None
        )
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


def _combine(column: pa.ChunkedArray) -> pa.ListArray:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

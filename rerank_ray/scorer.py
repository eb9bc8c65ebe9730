"""GPU/CPU stage: token ids -> relevance scores, one model replica per actor.

Within each block, rows are sorted by length, cut into micro-batches by token budget, scored,
and put back in input order. Rejected rows pass through with null scores.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rerank_ray import packing, schema
from rerank_ray.autotune import MicroBatch, TokenBudget, autotune_token_budget, score_microbatches

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
        device: str = "auto",
        dtype: str = "auto",
        token_budget: int | None = None,
        allow_pickle_weights: bool = False,
        trust_remote_code: bool = False,
        max_length: int = 512,
        fast_gelu: bool = False,
        concurrent_calls: int = 1,
        fused_kernels: bool = True,
    ) -> None:
        """``concurrent_calls``: how many ``__call__`` may run at once in threads (the job's
        ``scorer_calls``); the autotuned budget leaves memory for that many forward passes.
        ``fused_kernels``: on a GPU with Triton, each residual add + LayerNorm and (fp16/bf16)
        the attention and the exact GELU run as Triton kernels (same numerics as the eager ops;
        checked at start, eager ops if the check fails). On a GPU a plain checkpoint is read without
        transformers (``load_path`` says which way the model came)."""
        import time

        from rerank_ray.encoder import SUPPORTED_MODEL_TYPES
        from rerank_ray.model import PaddedRunner, load_cross_encoder, pick_device, pick_dtype

        t0 = time.perf_counter()
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        on_gpu = self.device.type == "cuda"
        self.runner = None
        # On a GPU, straight from the checkpoint where it is plain (no transformers import,
        # no HF model built first: seconds of start-up); else through transformers.
        if on_gpu and not trust_remote_code:
            self.runner = packed_runner_from_checkpoint(
                model_dir, self.device, self.dtype, fast_gelu, fused_kernels
            )
        self.load_path = "checkpoint" if self.runner is not None else "transformers"
        t_loaded = time.perf_counter()
        if self.runner is None:
            model = load_cross_encoder(
                model_dir,
                device=self.device,
                dtype=self.dtype,
                allow_pickle_weights=allow_pickle_weights,
                trust_remote_code=trust_remote_code,
            )
            t_loaded = time.perf_counter()
            if on_gpu and model.config.model_type in SUPPORTED_MODEL_TYPES:
                self.runner = packed_runner(
                    model, self.device, self.dtype, fast_gelu, fused_kernels
                )
            else:
                self.runner = PaddedRunner(model, self.device)
        t_runner = time.perf_counter()
        if token_budget is None and on_gpu:
            token_budget = autotune_token_budget(
                self.runner,
                model=str(model_dir),
                dtype=str(self.dtype).removeprefix("torch."),
                max_length=max_length,
                concurrent=concurrent_calls,
            )
        # Halved on CUDA OOM (autotune.score_microbatches), never below one full pair.
        self.budget = TokenBudget(token_budget or max(CPU_TOKEN_BUDGET, max_length), max_length)
        # Where the actor's set-up time went (traced by the pipeline; bench/ reports it).
        self.setup_seconds = {
            "load_model": round(t_loaded - t0, 2),
            "build_runner": round(t_runner - t_loaded, 2),
            "autotune": round(time.perf_counter() - t_runner, 2),
        }

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


def packed_runner(model, device, dtype, fast_gelu: bool, fused_kernels: bool):
    """The padding-free fast path (encoder.py) for a loaded model on a GPU.

    The GELU epilogue (tanh form) moves logits off HF's exact GELU, so it is opt-in. The
    Triton kernels (kernels.py: add+LayerNorm, varlen attention, the exact GELU) keep HF's
    numerics, so they are on where Triton runs and the model's shapes allow, unless their
    self-check fails on this GPU: then eager ops, with a warning saying why. (A matmul with
    the exact GELU in its epilogue, in Triton, cuDNN and CUTLASS, was tried and dropped:
    slower than cuBLAS + the GELU pass on an H200, see kernels.py.)
    """
    from rerank_ray.encoder import PackedEncoder

    options = _packed_options(model.config, device, dtype, fast_gelu, fused_kernels)
    return PackedEncoder(model, **options)


def packed_runner_from_checkpoint(model_dir, device, dtype, fast_gelu: bool, fused_kernels: bool):
    """``packed_runner`` built from the model directory without transformers
    (``PackedEncoder.from_checkpoint``), or None where that does not apply (the caller loads
    the model through transformers)."""
    from pathlib import Path

    from rerank_ray.encoder import PackedEncoder, checkpoint_config

    config = checkpoint_config(Path(model_dir))
    if config is None:
        return None
    options = _packed_options(config, device, dtype, fast_gelu, fused_kernels)
    return PackedEncoder.from_checkpoint(
        model_dir, device=device, dtype=dtype, config=config, **options
    )


def _packed_options(cfg, device, dtype, fast_gelu: bool, fused_kernels: bool) -> dict:
    import torch

    from rerank_ray import kernels

    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gelu_epilogue = fast_gelu and cfg.hidden_act.startswith("gelu")
    half = dtype in (torch.float16, torch.bfloat16)
    # The attention kernel's matmuls take 16-bit inputs (float32 would run them in TF32).
    triton_attention = half and kernels.attention_supported(head_dim)
    fused = fused_kernels and kernels.available(device)
    checked_head = head_dim if triton_attention else None
    if fused and (problem := kernels.self_check(device, dtype, checked_head)):
        logger.warning("Fused kernels off on this GPU, eager ops instead: %s", problem)
        fused = False
    return {
        "attention": "triton" if fused and triton_attention else "auto",
        "gelu_epilogue": gelu_epilogue,
        "fused_layer_norm": fused,
        # the exact GELU as a Triton pass, for 16-bit weights (within one ulp of PyTorch's)
        "triton_gelu": fused and half and not gelu_epilogue and cfg.hidden_act == "gelu",
    }


def _combine(column: pa.ChunkedArray) -> pa.ListArray:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)

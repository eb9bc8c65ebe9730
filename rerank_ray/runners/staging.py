"""A packed micro-batch's int inputs in one buffer: laid out on the host, read on the device.

The host side checks the micro-batch (offsets, lengths, the model's longest sequence) as it
lays it out: ids[T] | positions[T] | cu_seqlens[B+1] | (type ids[T]) | extra, where extra is
row[T] | col[T] for SDPA, the Triton attention's work list (then, with ``first_blocks``, a list
of each sequence's first row block), else empty. One buffer means one host-to-device copy.
"""

from __future__ import annotations

import numpy as np
import torch

from rerank_ray.runners import kernels


def stage(
    ids_flat: np.ndarray,
    offsets: np.ndarray,
    type_ids_flat: np.ndarray | None,
    *,
    max_tokens: int,
    pad_idx: int | None,
    attention: str,
    first_blocks: bool,
    pin: bool,
) -> tuple[torch.Tensor, int, int, int, bool, int]:
    """Validate a micro-batch and pack it into one int32 host buffer (pinned with ``pin``):
    ``(host, n_tok, n_seq, max_len, has_types, n_extra)``.

    ``max_tokens``: the model's longest sequence; ``pad_idx``: XLM-R/RoBERTa's padding id
    (positions start after it), None for BERT; ``attention``: the encoder's backend, which
    decides ``extra``; ``first_blocks``: add the first-row-block work list (Triton attention
    of the last layer on first tokens only).
    """
    offsets = np.asarray(offsets)
    ids_flat = np.asarray(ids_flat)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0:
        raise ValueError("offsets must be 1-D Arrow list offsets starting at 0, length B+1.")
    lengths = np.diff(offsets)
    n_seq, n_tok = len(lengths), int(offsets[-1])
    if n_tok != len(ids_flat):
        raise ValueError(f"offsets end at {n_tok} but ids_flat has {len(ids_flat)} tokens.")
    if lengths.min() < 1:
        raise ValueError("every sequence needs at least one token (found an empty one).")
    max_len = int(lengths.max())
    if max_len > max_tokens:
        raise ValueError(
            f"a sequence has {max_len} tokens; this model takes at most {max_tokens}. "
            "Lower max_length in the tokenize stage."
        )
    has_types = type_ids_flat is not None
    if has_types and len(type_ids_flat) != n_tok:
        raise ValueError(f"type_ids_flat has {len(type_ids_flat)} entries, ids {n_tok}.")
    if attention == "triton":
        work = kernels.attention_work(lengths)
        if first_blocks:  # then each sequence's first row block only
            work = np.concatenate([work, kernels.attention_work(np.minimum(lengths, 1))])
        n_extra = len(work)
    else:
        n_extra = 2 * n_tok if attention == "sdpa" else 0
    size = 2 * n_tok + n_seq + 1 + (n_tok if has_types else 0) + n_extra
    host = torch.empty(size, dtype=torch.int32, pin_memory=pin)
    buf = host.numpy()
    starts = offsets[:-1]
    col = np.arange(n_tok, dtype=np.int64) - np.repeat(starts, lengths)
    buf[:n_tok] = ids_flat
    if pad_idx is None:
        buf[n_tok : 2 * n_tok] = col
    else:  # HF create_position_ids_from_input_ids, restarted at every sequence
        not_pad = ids_flat != pad_idx
        running = np.cumsum(not_pad, dtype=np.int64)
        before = np.concatenate(([0], running))[starts]
        buf[n_tok : 2 * n_tok] = (running - np.repeat(before, lengths)) * not_pad
        buf[n_tok : 2 * n_tok] += pad_idx
    at = 2 * n_tok
    buf[at : at + n_seq + 1] = offsets
    at += n_seq + 1
    if has_types:
        buf[at : at + n_tok] = type_ids_flat
        at += n_tok
    if attention == "triton":
        buf[at:] = work
    elif attention == "sdpa":
        buf[at : at + n_tok] = np.repeat(np.arange(n_seq), lengths)
        buf[at + n_tok : at + 2 * n_tok] = col
    return host, n_tok, n_seq, max_len, has_types, n_extra


def parts(
    dev: torch.Tensor, n_tok: int, n_seq: int, has_types: bool, n_extra: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The staged buffer's views (on the device): ids, positions, cu_seqlens, type ids (None
    without) and extra."""
    ids, pos = dev[:n_tok], dev[n_tok : 2 * n_tok]
    at = 2 * n_tok
    cu = dev[at : at + n_seq + 1]
    at += n_seq + 1
    type_ids = None
    if has_types:
        type_ids = dev[at : at + n_tok]
        at += n_tok
    return ids, pos, cu, type_ids, dev[at : at + n_extra]

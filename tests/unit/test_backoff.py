"""OOM back-off and the budget cache: pure logic, driven by fake runners that raise OOM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rerank_ray.autotune import budget_cache_key, read_cached_budget, write_cached_budget
from rerank_ray.backoff import BudgetExhaustedError, TokenBudget, score_microbatches
from rerank_ray.packing import MicroBatch, token_budget_spans


def _micro_batch(lengths, seed=0) -> MicroBatch:
    rng = np.random.default_rng(seed)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    return MicroBatch(rng.integers(0, 1000, int(offsets[-1])).astype(np.int32), offsets, None)


def _expected(mb: MicroBatch) -> np.ndarray:
    """What the fake runner scores: each row's id sum, so a lost or repeated row shows."""
    return np.add.reduceat(mb.ids_flat.astype(np.float64), mb.offsets[:-1]).astype(np.float32)


class FakeRunner:
    """Scores rows by id sum; raises OOM whenever a call holds more than ``fits`` tokens."""

    def __init__(self, fits: int, padded: bool = False, error=torch.cuda.OutOfMemoryError):
        self.fits, self.padded, self.error = fits, padded, error
        self.calls: list[int] = []

    def score(self, ids_flat, offsets, type_ids_flat=None):
        lengths = np.diff(offsets)
        cost = len(lengths) * lengths.max() if self.padded else lengths.sum()
        self.calls.append(int(cost))
        if cost > self.fits:
            raise self.error("CUDA out of memory (fake)")
        return _expected(MicroBatch(ids_flat, offsets))


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class FakeAsyncRunner(FakeRunner):
    def submit(self, ids_flat, offsets, type_ids_flat=None):
        return _Done(self.score(ids_flat, offsets, type_ids_flat))


@pytest.mark.parametrize("runner_cls", [FakeRunner, FakeAsyncRunner])
@pytest.mark.parametrize("padded", [False, True])
def test_oom_halves_budget_and_loses_no_row(runner_cls, padded):
    lengths = np.sort(np.random.default_rng(1).integers(1, 64, 500))[::-1]
    budget = TokenBudget(4096, floor=64)
    spans = token_budget_spans(lengths, 4096, padded)
    batches = [_micro_batch(lengths[s:e], seed=s) for s, e in spans]
    runner = runner_cls(fits=900, padded=padded)
    got = score_microbatches(runner, batches, budget, padded=padded)
    assert len(got) == len(batches)
    for mb, scores in zip(batches, got, strict=True):
        np.testing.assert_array_equal(scores, _expected(mb))
    assert 64 <= budget.value <= 900  # halved until a micro-batch fit, never below the floor
    assert budget.value in (4096 // 2**k for k in range(1, 7))


def test_budget_floor_raises_a_clear_error():
    budget = TokenBudget(512, floor=128)
    mb = _micro_batch([120, 100])
    with pytest.raises(BudgetExhaustedError, match="below the floor 128"):
        score_microbatches(FakeRunner(fits=50), [mb], budget)


def test_other_runtime_errors_are_not_caught():
    budget = TokenBudget(512, floor=128)
    runner = FakeRunner(fits=10, error=RuntimeError)
    with pytest.raises(RuntimeError, match="fake"):
        score_microbatches(runner, [_micro_batch([120, 100])], budget)
    assert budget.value == 512 and len(runner.calls) == 1


def test_budget_below_floor_is_refused():
    with pytest.raises(ValueError, match="below the floor"):
        TokenBudget(100, floor=512)


def test_budget_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "budget.json"
    key = budget_cache_key("NVIDIA H200", "BAAI/bge-reranker-v2-m3", "float16", 512)
    assert read_cached_budget(path, key) is None
    write_cached_budget(path, key, 131072)
    write_cached_budget(path, "other", 8192)
    assert read_cached_budget(path, key) == 131072
    path.write_text("not json")
    assert read_cached_budget(path, key) is None


def test_halvings_are_counted():
    budget = TokenBudget(4096, floor=64)
    score_microbatches(FakeRunner(fits=900), [_micro_batch([60] * 40)], budget)
    assert budget.halvings == 3 and budget.value == 512

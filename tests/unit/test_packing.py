import numpy as np
import pytest

from rerank_ray.packing import inverse_order, length_order, token_budget_spans


def test_sort_then_unsort_restores_input_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=1000)
    order = length_order(lengths)
    assert np.all(np.diff(lengths[order]) <= 0)
    values = rng.normal(size=1000)
    assert np.array_equal(values[order][inverse_order(order)], values)


def test_equal_lengths_keep_input_order():
    order = length_order(np.array([5, 7, 5, 7, 5]))
    assert order.tolist() == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("padded", [True, False])
def test_spans_cover_every_row_once_within_budget(padded):
    rng = np.random.default_rng(1)
    lengths = np.sort(rng.integers(3, 300, size=777))[::-1]
    budget = 2048
    spans = token_budget_spans(lengths, budget, padded=padded)
    covered = [i for s, e in spans for i in range(s, e)]
    assert covered == list(range(len(lengths)))
    for s, e in spans:
        cost = (e - s) * lengths[s] if padded else lengths[s:e].sum()
        assert cost <= budget


def test_row_longer_than_budget_goes_alone():
    spans = token_budget_spans(np.array([900, 10, 10]), 512, padded=False)
    assert spans[0] == (0, 1)


def test_unsorted_lengths_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        token_budget_spans(np.array([1, 5]), 100, padded=True)

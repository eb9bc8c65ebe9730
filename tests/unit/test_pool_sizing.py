"""Pool sizing against the cluster: the tokenize pool's bounds and its start size from an
earlier run's measured rates (and their cache), the capacity check that turns a deadlock into
an error, and the reachability check of a cluster to join."""

import json
import os
import socket

import pytest

from rerank_ray.cluster import (
    IO_CPUS,
    MIN_IO_CPUS,
    ClusterError,
    capacity_shortfall,
    check_reachable,
    device_kind,
    tokenize_pool_bounds,
    tokenize_pool_start,
)
from rerank_ray.config import JobConfig
from rerank_ray.rates import (
    DEFAULT_BLOCK_ROWS,
    MAX_BLOCK_ROWS,
    MIN_CALLS,
    RATES_FILE,
    StageRates,
    block_rows,
    rates_key,
    read_rates,
    remember_rates,
)
from rerank_ray.report.collect import RunMetrics


@pytest.mark.parametrize(
    "scorers, cpus, pinned, bounds",
    [
        (1, 16, None, (1, 16 - 1 - IO_CPUS)),  # one GPU, a 16-core host: room to scale up
        (8, 128, None, (8, 128 - 8 - IO_CPUS)),  # 8 GPUs: floor of 1 tokenizer per scorer
        (1, 4, None, (1, 1)),  # g5.xlarge: 4 vCPU = scorer + 1 tokenizer + read/write
        (4, 8, None, (2, 2)),  # the floor shrinks to what leaves IO_CPUS free
        (1, 3, None, (1, 1)),  # never below 1 tokenizer
        (1, 2, None, (1, 1)),  # too small: the capacity check reports it
        (2, 64, 3, (3, 3)),  # --tokenize-actors pins the pool whatever the cluster
        (1, 2, 5, (5, 5)),
    ],
)
def test_tokenize_pool_bounds(scorers, cpus, pinned, bounds):
    assert tokenize_pool_bounds(scorers, cpus, pinned) == bounds


def test_unpinned_bounds_leave_read_and_write_their_cpus():
    for cpus in range(4, 200, 7):
        for scorers in range(1, 9):
            low, high = tokenize_pool_bounds(scorers, cpus, None)
            assert 1 <= low <= high
            assert low <= scorers
            if scorers + 1 + IO_CPUS <= cpus:
                assert scorers + high + IO_CPUS <= cpus


def _shortfall(**kw):
    args = dict(
        scorers=1, tokenizers=1, use_gpu=False, cpus=2, gpus=0, max_cpus=None, max_gpus=None
    )
    return capacity_shortfall(**{**args, **kw})


def test_reported_deadlock_is_a_shortfall_with_the_numbers():
    # `ray start --head --num-cpus 2` with --tokenize-actors 1 --num-actors 1: the two actors
    # took both CPUs and the read task never started.
    problem = _shortfall()
    assert problem is not None
    assert f"needs {1 + 1 + MIN_IO_CPUS} CPUs" in problem
    assert "has 2" in problem


def test_pools_that_leave_a_cpu_for_reading_fit():
    assert _shortfall(cpus=3) is None
    assert _shortfall(scorers=2, tokenizers=6, cpus=9) is None


def test_an_autoscaler_that_can_reach_the_cpus_is_not_a_shortfall():
    assert _shortfall(cpus=0, max_cpus=64) is None
    problem = _shortfall(scorers=8, tokenizers=8, cpus=4, max_cpus=12)
    assert problem is not None and "can reach 12" in problem


def test_more_scoring_actors_than_gpus():
    problem = _shortfall(scorers=4, tokenizers=4, use_gpu=True, cpus=64, gpus=1)
    assert problem is not None and "1 GPU(s)" in problem and "4 scoring actor(s)" in problem
    assert _shortfall(scorers=4, tokenizers=4, use_gpu=True, cpus=64, gpus=1, max_gpus=8) is None
    # On CPU the GPU count does not matter.
    assert _shortfall(scorers=4, tokenizers=4, use_gpu=False, cpus=64, gpus=0) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_address_names_it_its_source_and_the_fix():
    port = _closed_port()
    with pytest.raises(ClusterError) as err:
        check_reachable(f"127.0.0.1:{port}", "RAY_ADDRESS")
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "RAY_ADDRESS" in str(err.value) and "unset RAY_ADDRESS" in str(err.value)
    with pytest.raises(ClusterError, match="delete that file"):
        check_reachable(f"127.0.0.1:{port}", "the file /tmp/x/ray_current_cluster")


def test_reachable_address_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "RAY_ADDRESS")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_a_local_ray_instance_gets_the_cpus_this_process_may_run_on():
    """Under ``taskset`` or a container's cpuset the host's CPU count overstates what the
    job can use: the local instance is sized from the affinity mask."""
    from rerank_ray.cluster import available_cpus

    before = os.sched_getaffinity(0)
    one = {min(before)}
    os.sched_setaffinity(0, one)
    try:
        assert available_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert available_cpus() == len(before)


# H200 + a MiniLM-size model: one scoring actor does ~75,000 rows per busy second, one
# tokenize actor ~3,900.
SMALL_MODEL_ON_GPU = StageRates(score_rows_per_s=75_000, tokenize_rows_per_s=3_900)


def test_slower_tokenizing_starts_the_actors_that_keep_the_scorers_busy():
    assert tokenize_pool_start(1, SMALL_MODEL_ON_GPU, low=1, high=64) == 20  # ceil(19.2)
    assert tokenize_pool_start(2, SMALL_MODEL_ON_GPU, low=2, high=64) == 39  # ceil(38.5)
    assert tokenize_pool_start(1, StageRates(8_000, 4_000), low=1, high=64) == 2  # exact


def test_faster_tokenizing_starts_at_the_floor():
    large_model = StageRates(score_rows_per_s=900, tokenize_rows_per_s=3_900)
    assert tokenize_pool_start(1, large_model, low=1, high=13) == 1
    # 4 scorers would need 1 tokenizer; the floor of 1 per scorer holds.
    assert tokenize_pool_start(4, large_model, low=4, high=13) == 4


def test_start_is_clamped_to_the_ceiling():
    assert tokenize_pool_start(1, SMALL_MODEL_ON_GPU, low=1, high=13) == 13


def test_without_rates_a_gpu_pool_starts_at_the_ceiling_and_a_cpu_pool_at_the_floor():
    # A model's first run: a GPU scoring actor may outrun every tokenize actor the CPUs hold.
    assert tokenize_pool_start(1, None, low=1, high=13, use_gpu=True) == 13
    assert tokenize_pool_start(8, None, low=8, high=118, use_gpu=True) == 118
    # On CPU the tokenize actors would take the scoring actors' cores.
    assert tokenize_pool_start(1, None, low=1, high=13, use_gpu=False) == 1
    assert tokenize_pool_start(8, None, low=8, high=118, use_gpu=False) == 8


def test_a_pinned_pool_keeps_its_size():
    assert tokenize_pool_start(1, SMALL_MODEL_ON_GPU, low=3, high=3) == 3


def test_device_kind_names_the_gpu_type_when_ray_knows_it():
    gpu_node = {"CPU": 16.0, "GPU": 1.0, "accelerator_type:H200": 1.0}
    assert device_kind(gpu_node, use_gpu=True) == "H200"
    assert device_kind({"CPU": 16.0, "GPU": 1.0}, use_gpu=True) == "cuda"
    assert device_kind(gpu_node, use_gpu=False) == "cpu"


def _run_metrics(calls: int = MIN_CALLS) -> dict:
    """A run's metrics: one tokenize actor busy all along at 3,900 rows/s; one scoring actor
    at 75,000 rows per busy second that waits for tokens between its ``calls`` calls."""
    m = RunMetrics(0.0)
    for k in range(calls):
        m.add({"stage": "tokenize", "actor": "t", "start": k, "end": k + 1.0, "rows": 3_900})
        m.add(
            {
                "stage": "score",
                "actor": "s",
                "start": k + 1.0,
                "end": k + 1.052,
                "rows": 3_900,
                "pairs": 3_900,
            }
        )
    return m.summary(calls + 2.0)


def test_rates_are_per_busy_second_not_what_a_starved_scorer_got():
    rates = StageRates.from_metrics(_run_metrics())
    assert rates is not None
    assert rates.tokenize_rows_per_s == pytest.approx(3_900)
    assert rates.score_rows_per_s == pytest.approx(75_000, rel=1e-3)
    assert StageRates.from_metrics(None) is None
    assert StageRates.from_metrics({"stages": {"tokenize": {"rows_per_busy_s": 3_900.0}}}) is None


def test_a_run_of_few_calls_leaves_no_rates(tmp_path):
    """A short run (the demo) measures mostly its first calls: its rates would size the next
    large run of the model, so they are not kept, and an earlier run's stay."""
    assert StageRates.from_metrics(_run_metrics(calls=MIN_CALLS - 1)) is None
    path = tmp_path / RATES_FILE
    kept = remember_rates(path, "m", _run_metrics(calls=MIN_CALLS))
    assert kept is not None
    assert remember_rates(path, "m", _run_metrics(calls=1)) is None
    assert read_rates(path, "m") == kept


def _cfg(**kw) -> JobConfig:
    return JobConfig(
        **{"input": "in/", "output": "out/", "model": "cross-encoder/ms-marco-MiniLM-L6-v2", **kw}
    )


def test_rates_cache_round_trip(tmp_path):
    path = tmp_path / "cache" / RATES_FILE
    key = rates_key(_cfg(), "H200")
    assert read_rates(path, key) is None
    assert remember_rates(path, "other-model", _run_metrics()) is not None
    remembered = remember_rates(path, key, _run_metrics())
    assert remembered is not None and read_rates(path, key) == remembered
    assert read_rates(path, "other-model") == remembered  # the other entry is kept
    assert tokenize_pool_start(1, read_rates(path, key), low=1, high=64) == 20
    # What changes the rates changes the key.
    for other in (
        rates_key(_cfg(max_length=256), "H200"),
        rates_key(_cfg(long_docs="chunk"), "H200"),
        rates_key(_cfg(dtype="bfloat16"), "H200"),
        rates_key(_cfg(), "cpu"),
        rates_key(_cfg(model="BAAI/bge-reranker-v2-m3"), "H200"),
    ):
        assert other != key and read_rates(path, other) is None
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed


def test_a_corrupt_rates_file_reads_as_no_rates_and_is_replaced(tmp_path):
    path = tmp_path / RATES_FILE
    key = rates_key(_cfg(), "H200")
    for body in ("not json", "[1, 2]", json.dumps({key: {"score_rows_per_s": "fast"}})):
        path.write_text(body)
        assert read_rates(path, key) is None
    assert remember_rates(path, key, _run_metrics()) is not None
    assert read_rates(path, key) is not None


def test_an_unwritable_rates_file_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = blocker / RATES_FILE  # its folder is a file
    assert remember_rates(path, "key", _run_metrics()) is None
    assert "could not remember the stage rates" in caplog.text
    assert read_rates(path, "key") is None


# Rows per busy second measured on an H200 (bench/results/2026-11-30-h200*-feed-*.json): a
# MiniLM-L6-size scorer and a bge-reranker-v2-m3-size one, and one WordPiece tokenize actor.
SMALL_MODEL = StageRates(score_rows_per_s=72_425.2, tokenize_rows_per_s=3_734.2)
LARGE_MODEL = StageRates(score_rows_per_s=7_923.9, tokenize_rows_per_s=5_372.3)


def test_a_fast_scorer_gets_larger_blocks_a_slow_one_the_default():
    rows = 600_000
    assert block_rows(None, SMALL_MODEL, rows, tokenizers=13) == MAX_BLOCK_ROWS
    assert block_rows(None, LARGE_MODEL, rows, tokenizers=3) == DEFAULT_BLOCK_ROWS
    middle = StageRates(score_rows_per_s=30_000, tokenize_rows_per_s=4_000)
    assert DEFAULT_BLOCK_ROWS < block_rows(None, middle, rows, tokenizers=8) < MAX_BLOCK_ROWS


def test_blocks_stay_small_enough_to_spread_a_small_input_over_the_tokenizers():
    assert block_rows(None, SMALL_MODEL, 20_000, tokenizers=13) == DEFAULT_BLOCK_ROWS
    # 4 blocks for each of 13 tokenizers: 4096-row blocks fit 213,000 rows, 8192 do not
    assert block_rows(None, SMALL_MODEL, 213_000, tokenizers=13) == 4096


def test_without_rates_or_with_batch_rows_given_the_block_size_is_not_derived():
    assert block_rows(None, None, 600_000, tokenizers=13) == DEFAULT_BLOCK_ROWS
    assert block_rows(500, SMALL_MODEL, 600_000, tokenizers=13) == 500

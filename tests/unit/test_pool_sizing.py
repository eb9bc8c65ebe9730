"""Pool sizing against the cluster: the tokenize pool's bounds, the capacity check that turns
a deadlock into an error, and the reachability check of a cluster to join."""

import os
import socket

import pytest

from rerank_ray.cluster import (
    IO_CPUS,
    MIN_IO_CPUS,
    ClusterError,
    capacity_shortfall,
    check_reachable,
    tokenize_pool_bounds,
)


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

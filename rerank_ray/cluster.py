"""Ray and its resources: join or start Ray, and size the actor pools to the cluster.

The tokenize pool holds 1 CPU per actor and the scoring pool 1 CPU (plus 1 GPU on a GPU
cluster) per actor; read and write tasks need CPUs of their own alongside them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from rerank_ray.config import JobConfig
from rerank_ray.errors import RerankError

log = logging.getLogger("rerank_ray")

TOKENIZE_ACTORS_PER_SCORER = 2
# CPUs kept for read and write tasks, so reading and writing stream alongside scoring.
IO_CPUS = 2


class ClusterError(RerankError, RuntimeError):
    """The Ray cluster cannot run this job as configured."""


def tokenize_actors(cfg: JobConfig, scorers: int) -> int:
    """Size of the tokenize pool: as configured, else ``TOKENIZE_ACTORS_PER_SCORER`` per scoring
    actor, so the tokenize rate grows with the scoring pool."""
    return cfg.tokenize_actors or TOKENIZE_ACTORS_PER_SCORER * scorers


def cpus_needed(cfg: JobConfig, gpus: float = 0) -> int:
    """Logical CPUs the job's actor pools hold (1 each), plus ``IO_CPUS`` for read and write
    tasks."""
    scorers = cfg.num_actors or cfg.min_actors or max(int(gpus), 1)
    return tokenize_actors(cfg, scorers) + scorers + IO_CPUS


def init_ray(cfg: JobConfig) -> None:
    """Join the cluster the environment names (``ray job submit``, RAY_ADDRESS, a local
    ``ray start``), else start a local instance with at least the logical CPUs the job's
    actors need; with fewer (e.g. on a 2-core machine) Ray would wait for CPUs forever."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)), log_to_driver=True)
    except ValueError as err:
        if "existing cluster" not in str(err):
            raise
        ray.init(log_to_driver=True)  # found a cluster started with `ray start` here


@dataclass(frozen=True)
class Pools:
    """The actor pools of one run and what they hold."""

    use_gpu: bool
    score: Any  # ActorPoolStrategy
    tokenize: Any  # ActorPoolStrategy
    scorer_calls: int  # concurrent calls per scoring actor
    cpus_needed: int


def plan_pools(cfg: JobConfig) -> Pools:
    """The scoring and tokenize pools for this cluster and config."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if cfg.device == "cuda" and gpus == 0:
        raise ClusterError(
            "--device cuda was asked for but the Ray cluster has no GPUs; add GPU nodes or "
            "use --device cpu."
        )
    # On a GPU, a scoring actor runs `scorer_calls` blocks at once in threads: one block's
    # forward passes are queued on the GPU while the next block is fetched, sorted and staged
    # and the last one's scores go back to Ray, so the GPU does not idle between blocks. All
    # calls share the actor's CUDA stream, hence the GPU still runs one forward at a time. On
    # a CPU, the calls would only compete for the same cores: one at a time.
    calls = cfg.scorer_calls if use_gpu else 1
    threads = (
        {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True}
        if calls > 1
        else {}
    )
    if cfg.min_actors is not None:
        score = ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors, **threads)
        tokenize = (
            ActorPoolStrategy(size=cfg.tokenize_actors)
            if cfg.tokenize_actors
            else ActorPoolStrategy(
                min_size=tokenize_actors(cfg, cfg.min_actors),
                max_size=tokenize_actors(cfg, cfg.max_actors),
            )
        )
        n_tokenize = tokenize_actors(cfg, cfg.min_actors)
    else:
        size = cfg.num_actors or (max(int(gpus), 1) if use_gpu else 1)
        score = ActorPoolStrategy(size=size, **threads)
        n_tokenize = tokenize_actors(cfg, size)
        tokenize = ActorPoolStrategy(size=n_tokenize)
    needed = cpus_needed(cfg, gpus if use_gpu else 0)
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < needed:
        # Not an error: an autoscaling cluster may still add the nodes.
        log.warning(
            "The Ray cluster has %g CPUs now, but this job's actors need %d (%d tokenize "
            "actor(s) + the scoring actors, 1 CPU each, + %d for reading and writing). Unless "
            "the cluster autoscales, lower --tokenize-actors / --num-actors or add CPUs: the "
            "job waits until the resources exist.",
            cpus,
            needed,
            n_tokenize,
            IO_CPUS,
        )
    return Pools(use_gpu, score, tokenize, calls, needed)

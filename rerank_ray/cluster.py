"""Ray and its resources: join or start Ray, and size the actor pools to the cluster.

The tokenize pool holds 1 CPU per actor and the scoring pool 1 CPU (plus 1 GPU on a GPU
cluster) per actor; read and write tasks need CPUs of their own alongside them. A job whose
pools cannot all be placed would not wait but deadlock (the actors hold every CPU and the
read task never starts), so a cluster that lacks the resources and cannot grow them is an
error raised before any work is scheduled.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from rerank_ray import rates
from rerank_ray.config import JobConfig
from rerank_ray.errors import RerankError

log = logging.getLogger("rerank_ray")

# CPUs the default tokenize pool leaves to read and write tasks, so that reading and writing
# stream alongside scoring.
IO_CPUS = 2
# With fewer free CPUs than this the read task never starts: the pools hold every CPU.
MIN_IO_CPUS = 1
# Seconds to wait for a TCP connection to the cluster's GCS before calling it unreachable.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(RerankError, RuntimeError):
    """The Ray cluster cannot run this job as configured."""


def tokenize_pool_bounds(scorers: int, cluster_cpus: float, pinned: int | None) -> tuple[int, int]:
    """(min, max) size of the tokenize pool for ``scorers`` scoring actors (1 CPU each) on a
    cluster of ``cluster_cpus`` CPUs; ``pinned`` (``--tokenize-actors``) fixes both.

    Unpinned, the pool autoscales with demand between a floor of 1 tokenize actor per scoring
    actor and every CPU the scoring actors and ``IO_CPUS`` leave; a floor that does not fit
    shrinks to what fits (at least 1), so the pools never take the read and write tasks' CPUs.
    """
    if pinned is not None:
        return pinned, pinned
    ceiling = max(1, math.floor(cluster_cpus) - scorers - IO_CPUS)
    return min(scorers, ceiling), ceiling


def tokenize_pool_start(
    scorers: int, measured: rates.StageRates | None, low: int, high: int, use_gpu: bool = True
) -> int:
    """Tokenize actors to start the pool with: as many as keep ``scorers`` scoring actors busy
    at the rates an earlier run ``measured``, within [``low``, ``high``]. A pinned pool
    (``low == high``) keeps its size.

    Without measured rates (a model's first run here): ``high`` on a GPU, whose scoring actor
    may outrun every tokenize actor the CPUs hold and would otherwise wait while the pool grows
    one actor at a time (Ray Data's autoscaler then removes the idle ones); ``low`` on CPU,
    where tokenize actors racing ahead would take the cores the scoring actors compute on."""
    if measured is None:
        return high if use_gpu else low
    wanted = math.ceil(scorers * measured.score_rows_per_s / measured.tokenize_rows_per_s)
    return min(max(wanted, low), high)


def device_kind(resources: dict[str, float], use_gpu: bool) -> str:
    """What the scoring actors run on, for the rates' cache key: the cluster's GPU type(s)
    as Ray labels them (``accelerator_type:<name>`` resources), else ``cuda``, or ``cpu``."""
    if not use_gpu:
        return "cpu"
    prefix = "accelerator_type:"
    types = sorted(k.removeprefix(prefix) for k in resources if k.startswith(prefix))
    return "+".join(types) or "cuda"


def capacity_shortfall(
    *,
    scorers: int,
    tokenizers: int,
    use_gpu: bool,
    cpus: float,
    gpus: float,
    max_cpus: float | None,
    max_gpus: float | None,
) -> str | None:
    """Why ``scorers`` scoring and ``tokenizers`` tokenize actors cannot all be placed, or
    None when they fit. ``max_cpus``/``max_gpus``: the most the cluster's autoscaler can
    reach (None: no autoscaler reported; the cluster stays as it is)."""
    cpus_needed = scorers + tokenizers + MIN_IO_CPUS
    reach_cpus = max(cpus, max_cpus or 0)
    if cpus_needed > reach_cpus:
        return (
            f"this job needs {cpus_needed} CPUs ({scorers} scoring actor(s) + {tokenizers} "
            f"tokenize actor(s), 1 CPU each, + at least {MIN_IO_CPUS} for the read and write "
            f"tasks) but the Ray cluster has {cpus:g}"
            + (f" and its autoscaler can reach {max_cpus:g}" if max_cpus else "")
        )
    reach_gpus = max(gpus, max_gpus or 0)
    if use_gpu and scorers > reach_gpus:
        return (
            f"this job asks for {scorers} scoring actor(s), 1 GPU each, but the Ray cluster "
            f"has {gpus:g} GPU(s)"
            + (f" and its autoscaler can reach {max_gpus:g}" if max_gpus else "")
        )
    return None


def _address_to_join() -> tuple[str, str] | None:
    """(address, where it came from) of the cluster ``ray.init()`` would join, or None when
    it would start a local instance: RAY_ADDRESS, else the ``ray_current_cluster`` file that
    ``ray start`` leaves in Ray's temp dir (read by ``ray.init()`` the same way)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None
    if env and env != "auto":
        return env, "RAY_ADDRESS"
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        return None
    return (recorded, f"the file {path} (written by `ray start`)") if recorded else None


def check_reachable(address: str, source: str) -> None:
    """Raise ``ClusterError`` unless a TCP connection to ``address`` (the cluster's GCS)
    opens within ``CONNECT_TIMEOUT_S``; Ray itself would retry for minutes in silence."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port (e.g. a Ray Client URL without a port): Ray reports it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as err:
        reason = err.strerror or type(err).__name__
    if source == "RAY_ADDRESS":
        fix = (
            "start the cluster (`ray start --head`), point RAY_ADDRESS at a running one, or "
            "unset RAY_ADDRESS so that rerank-ray starts a local Ray instance"
        )
    else:
        fix = (
            "the head that wrote it is gone: delete that file so that rerank-ray starts a "
            "local Ray instance, or start the cluster again (`ray start --head`)"
        )
    raise ClusterError(
        f"Cannot reach the Ray cluster at {address} (from {source}): {reason} within "
        f"{CONNECT_TIMEOUT_S:g} s. Fix: {fix}."
    )


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``),
    which a local Ray instance gets as its CPUs; the host's count where there is no mask."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_ray(cfg: JobConfig) -> None:
    """Join the cluster the environment names (``ray job submit``, RAY_ADDRESS, a local
    ``ray start``) after checking it answers, else start a local instance with at least the
    logical CPUs the job's actors need; with fewer (e.g. on a 2-core machine) the pools
    would hold every CPU and the read task would never start. A local instance lives only as
    long as the job and starts no dashboard (as the demo's): to watch a job in the
    dashboard, run it on a ``ray start`` cluster (README)."""
    import ray

    if ray.is_initialized():
        return
    found = _address_to_join()
    if found is not None:
        check_reachable(*found)
        ray.init(log_to_driver=True)
        return
    scorers = cfg.num_actors or cfg.min_actors or 1
    tokenizers = cfg.tokenize_actors or scorers
    local_cpus = max(available_cpus(), scorers + tokenizers + IO_CPUS)
    ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=True)


@dataclass(frozen=True)
class Pools:
    """The actor pools of one run and what they hold."""

    use_gpu: bool
    score: Any  # ActorPoolStrategy
    tokenize: Any  # ActorPoolStrategy
    scorer_calls: int  # concurrent calls per scoring actor
    tokenize_bounds: tuple[int, int]  # (min, max) tokenize actors
    tokenize_start: int  # tokenize actors the pool starts with
    batch_rows: int  # rows per block handed to each stage
    rates_key: str  # the key of this run's stage rates in the rates file
    measured_rates: rates.StageRates | None  # an earlier run's rates that sized the pool

    def tokenize_plan(self) -> dict[str, Any]:
        """The tokenize pool's sizes and the rates that chose its start (the run's metrics)."""
        return {
            "bounds": list(self.tokenize_bounds),
            "start": self.tokenize_start,
            "remembered_rates": asdict(self.measured_rates)
            if self.measured_rates is not None
            else None,
        }


def _autoscaler_max() -> tuple[float | None, float | None]:
    """(CPUs, GPUs) the cluster's autoscaler can reach, or (None, None) when the cluster
    reports no autoscaler (e.g. a `ray start` cluster): the approach of Ray Train's check."""
    import ray

    try:
        reach = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception as err:  # a private API: an unexpected answer only loses the hint
        log.debug("no autoscaler limits from the cluster: %s", err)
        return None, None
    if not reach:
        return None, None
    return reach.get("CPU"), reach.get("GPU")


def plan_pools(cfg: JobConfig, rows: int | None = None) -> Pools:
    """The scoring and tokenize pools for this cluster and config, and the rows per block
    (``rates.block_rows``; ``rows``: the rows to score, when known).

    A fixed scoring pool (``--num-actors`` or the default) that the cluster cannot place,
    now or through its autoscaler, raises ``ClusterError`` with the numbers and the fix; an
    autoscaling pool (``--min-actors/--max-actors``) only warns, as its nodes may come.
    """
    import ray
    from ray.data import ActorPoolStrategy

    resources = ray.cluster_resources() if ray.is_initialized() else {}
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
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
    autoscaling = cfg.min_actors is not None
    if autoscaling:
        scorers = cfg.min_actors
        score = ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors, **threads)
    else:
        scorers = cfg.num_actors or (max(int(gpus), 1) if use_gpu else 1)
        score = ActorPoolStrategy(size=scorers, **threads)
    low, high = tokenize_pool_bounds(scorers, cpus, cfg.tokenize_actors)
    fits_now = high
    if autoscaling and cfg.tokenize_actors is None:
        high = max(high, cfg.max_actors)  # the cluster grows with the scoring pool
    key = rates.rates_key(cfg, device_kind(resources, use_gpu))
    measured = rates.read_rates(rates.cache_path(cfg), key)
    # Within what the CPUs present now hold: actors beyond them would only wait for nodes.
    start = tokenize_pool_start(scorers, measured, low, fits_now, use_gpu)
    block = rates.block_rows(cfg.batch_rows, measured, rows, start)
    # Ray Data's autoscaler adds tokenize actors while blocks queue at their input and
    # removes idle ones, down to the floor; a pinned size is one fixed pool. The pool starts
    # at the size an earlier run's rates call for, so a short job does not spend its first
    # seconds growing it.
    tokenize = (
        ActorPoolStrategy(size=low)
        if low == high
        else ActorPoolStrategy(min_size=low, max_size=high, initial_size=start)
    )
    max_cpus, max_gpus = _autoscaler_max()
    problem = capacity_shortfall(
        scorers=scorers,
        tokenizers=low,
        use_gpu=use_gpu,
        cpus=cpus,
        gpus=gpus,
        max_cpus=max_cpus,
        max_gpus=max_gpus,
    )
    if problem and not autoscaling:
        raise ClusterError(
            f"The Ray cluster cannot run this job: {problem}, and no autoscaler will add "
            "them, so the job would wait forever. Fix: start the head with enough CPUs "
            f"(`ray start --head --num-cpus {scorers + low + IO_CPUS}`), lower "
            "--tokenize-actors / --num-actors, add nodes, or use --min-actors/--max-actors "
            "on an autoscaling cluster."
        )
    if problem:
        log.warning(
            "The Ray cluster cannot place this job's actors yet: %s. The autoscaling pool "
            "waits for the autoscaler to add nodes; without one, lower --min-actors / "
            "--tokenize-actors or add nodes.",
            problem,
        )
    elif cpus < scorers + low + IO_CPUS:
        log.warning(
            "The Ray cluster has %g CPUs: after %d scoring and %d tokenize actor(s), the read "
            "and write tasks share %g CPU(s) and may slow the job; %d CPUs leave them %d.",
            cpus,
            scorers,
            low,
            cpus - scorers - low,
            scorers + low + IO_CPUS,
            IO_CPUS,
        )
    log.info(
        "actor pools: %s scoring actor(s), %s tokenize actor(s)%s",
        f"{cfg.min_actors}-{cfg.max_actors}" if autoscaling else scorers,
        low if low == high else f"{low}-{high} (autoscaling)",
        "" if low == high else "; " + _start_reason(start, measured),
    )
    if block != rates.DEFAULT_BLOCK_ROWS and cfg.batch_rows is None:
        log.info("blocks of %d rows (a fast scoring actor in an earlier run)", block)
    return Pools(use_gpu, score, tokenize, calls, (low, high), start, block, key, measured)


def _start_reason(start: int, measured: rates.StageRates | None) -> str:
    if measured is None:
        return f"tokenize pool starts at {start} (no rates of an earlier run of this model yet)"
    return (
        f"tokenize pool starts at {start} (rates of an earlier run of this model, per busy "
        f"actor: scoring {measured.score_rows_per_s:,.0f} rows/s, tokenize "
        f"{measured.tokenize_rows_per_s:,.0f} rows/s)"
    )

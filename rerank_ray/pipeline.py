"""Build and run the job: source -> tokenize -> score -> sink, as one lazy Ray Dataset."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from rerank_ray import schema, sink, source, storage
from rerank_ray.config import JobConfig

log = logging.getLogger("rerank_ray")

Transform = Callable[[Any], Any]


def s3_settings(cfg: JobConfig) -> storage.S3Settings:
    return storage.S3Settings.resolve(cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_verify_tls)


def run(
    config: JobConfig,
    transform: Transform | None = None,
    filtered_reasons: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run a rerank job and return its manifest (also written as ``<output>/_SUCCESS``).

    ``transform``, if given, maps the scored Dataset (rejected rows included, marked by a
    non-null ``reject_reason``) before it is written; job modes use it to rank or label.
    Rows the transform marks with a reason in ``filtered_reasons`` are counted in the
    manifest but not written (a nightly top-k drops most candidates on purpose).
    Everything that can be checked before scoring is checked first, so bad input, bad
    credentials or an unwritable output fail in seconds, not after the model has loaded.
    """

    t0 = time.time()
    cfg = config.with_defaults_resolved()
    s3 = s3_settings(cfg)
    plan = source.plan_source(cfg, s3)
    sink.check_output_writable(cfg.output, s3, cfg.run_id)
    model_dir = storage.resolve_model(
        cfg.model,
        s3=s3,
        revision=cfg.revision,
        cache_dir=cfg.model_cache_dir,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )
    storage.check_max_length(model_dir, cfg.max_length)
    # Hashing the weights (GBs) is only needed for the manifest: it runs in a thread while
    # the job starts its actors, and is joined when the manifest is written.
    fingerprint = _in_thread(storage.weights_fingerprint, model_dir)
    log.info(
        "rerank run %s: %d rows in %d %s file(s) from %s -> %s",
        cfg.run_id,
        plan.num_rows,
        len(plan.paths),
        plan.format,
        cfg.input,
        cfg.output,
    )
    lock = sink.lock_path(
        storage.resolve(cfg.output, s3)[1], cfg.effective_run_date, cfg.partition_by
    )
    sink.acquire_lock(cfg.output, s3, cfg.run_id, lock)
    try:
        manifest = _score_and_commit(cfg, s3, plan, fingerprint, transform, filtered_reasons, t0)
    finally:
        sink.release_lock(cfg.output, s3, cfg.run_id, lock)
    print(summary_line(manifest), flush=True)
    return manifest


def _in_thread(fn, *args) -> Callable[[], Any]:
    """Start ``fn(*args)`` in a thread; the returned callable waits for its result
    (re-raising its exception)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=getattr(fn, "__name__", "work"))
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future.result


TOKENIZE_ACTORS_PER_SCORER = 2


def tokenize_actors(cfg: JobConfig, scorers: int) -> int:
    """Size of the tokenize pool: as configured, else 2 per scoring actor. One H200 scores
    ~6,200 pairs/s of the bench mix and one tokenize actor ~9,000 on that host (job traces,
    bench/results, 2026-11-22). A fixed 2 would cap a many-GPU job at about one GPU's rate."""
    return cfg.tokenize_actors or TOKENIZE_ACTORS_PER_SCORER * scorers


def cpus_needed(cfg: JobConfig, gpus: float = 0) -> int:
    """Logical CPUs the job's actor pools hold (1 each), plus one for read tasks and one for
    write tasks so that reading and writing stream alongside scoring."""
    scorers = cfg.num_actors or cfg.min_actors or max(int(gpus), 1)
    return tokenize_actors(cfg, scorers) + scorers + 2


def _init_ray(cfg: JobConfig) -> None:
    """Join the cluster the environment names (``ray job submit``, RAY_ADDRESS, a local
    ``ray start``), else start a local instance with at least the logical CPUs the job's
    actors need; with fewer (e.g. on a 2-core machine) Ray would wait for CPUs forever."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    try:
        ray.init(num_cpus=max(os.cpu_count() or 1, cpus_needed(cfg)), log_to_driver=True)
    except ValueError as err:
        if "existing cluster" not in str(err):
            raise
        ray.init(log_to_driver=True)  # found a cluster started with `ray start` here


def _score_and_commit(cfg, s3, plan, fingerprint, transform, filtered_reasons, t0):
    """Resume what an earlier attempt of this run id staged, score the rest, commit."""
    import ray

    if transform is None and not source.has_own_path_column(plan):
        resumed = sink.resume_state(cfg.output, s3, cfg.run_id, plan.rows_by_path())
    else:
        # Per-query transforms mix shards, so their partial work cannot be kept.
        sink.discard_staging(cfg.output, s3, cfg.run_id)
        resumed = sink.ResumeState(entries=[], done_sources=set())
    todo = [p for p in plan.paths if p not in resumed.done_sources]
    if resumed.done_sources:
        log.info(
            "resuming run %s: %d of %d shards (%d rows) already staged; scoring %d shard(s)",
            cfg.run_id,
            len(resumed.done_sources),
            len(plan.paths),
            resumed.rows,
            len(todo),
        )
    out = sink.RerankSink(
        output_uri=cfg.output,
        s3=s3,
        run_id=cfg.run_id,
        run_date=cfg.effective_run_date,
        partition_by=cfg.partition_by,
        expected_rows=plan.num_rows,
        manifest_extra={
            "model": cfg.model,
            "input": cfg.input,
            "output": cfg.output,
            "input_files": len(plan.paths),
            "config": _public_config(cfg),
            "ray_version": ray.__version__,
        },
        reject_columns=[cfg.column_map.get(c, c) for c in plan.schema.names],
        filtered_reasons=filtered_reasons,
        resumed=resumed,
        rows_per_file=cfg.rows_per_file,
        late_manifest_extra=lambda: {"weights_sha256": fingerprint()},
    )
    out.started = t0
    if not todo:
        return out.commit([])
    if not ray.is_initialized():
        _init_ray(cfg)
    ds = build_dataset(cfg, plan, s3, paths=todo)
    if transform is not None:
        if not source.has_own_path_column(plan):
            # The source-file column serves resume, which a per-query transform turns off
            # (above). Dropped, it is not shuffled, and the sink writes one file per write
            # task and flush instead of one per (write task x input shard): with hundreds of
            # shards, hundreds of times fewer files.
            ds = ds.drop_columns([sink.SOURCE_COLUMN])
        ds = transform(ds)
    try:
        ds.write_datasink(out)
    except Exception as err:
        # A data page that does not decode fails a read task, and Ray's error names no file.
        source.raise_if_unreadable(plan, todo, cfg.run_id, err)
        raise
    if out.manifest is None:
        raise RuntimeError("The write finished without committing a manifest.")
    return out.manifest


def build_dataset(
    cfg: JobConfig, plan: source.SourcePlan, s3: storage.S3Settings, paths: list[str] | None = None
):
    """The lazy Dataset graph: read -> tokenize (CPU actors) -> score (GPU/CPU actors)."""
    import ray
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if cfg.device == "cuda" and gpus == 0:
        raise RuntimeError(
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
        pool = ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors, **threads)
        tokenize_pool = (
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
        pool = ActorPoolStrategy(size=size, **threads)
        n_tokenize = tokenize_actors(cfg, size)
        tokenize_pool = ActorPoolStrategy(size=n_tokenize)
    cpus = ray.cluster_resources().get("CPU", 0)
    needed = cpus_needed(cfg, gpus if use_gpu else 0)
    if cpus < needed:
        # Not an error: an autoscaling cluster may still add the nodes.
        log.warning(
            "The Ray cluster has %g CPUs now, but this job's actors need %d (%d tokenize "
            "actor(s) + the scoring actors, 1 CPU each, + 2 for reading and writing). Unless "
            "the cluster autoscales, lower --tokenize-actors / --num-actors or add CPUs: the "
            "job waits until the resources exist.",
            cpus,
            needed,
            n_tokenize,
        )
    model_ref = cfg.model  # each node resolves it itself (s3:// is downloaded once per node)
    keep = set(cfg.keep_columns) if cfg.keep_columns is not None else None
    drop = tuple(
        canon
        for original, canon in cfg.column_map.items()
        if canon in schema.TEXT_COLUMNS and keep is not None and original not in keep
    )
    extra_drop = [
        cfg.column_map.get(c, c)
        for c in plan.schema.names
        if keep is not None and c not in keep and c not in cfg.column_map
    ]
    ds = source.read_dataset(plan, cfg, paths)
    if extra_drop:
        ds = ds.drop_columns(extra_drop)
    # The reader hands on a shard as one block, and a map stage emits one block per input
    # block: scoring would wait until a whole shard (of any size) was tokenized, and a few
    # large shards would spread unevenly over many GPUs. Streaming repartition (no barrier)
    # cuts blocks to batch_rows rows, so tokenized rows reach the GPUs a batch at a time.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_rows)
    ds = ds.map_batches(
        _ResolvedTokenize,
        fn_constructor_kwargs={
            "model": model_ref,
            "s3": s3,
            "cfg": cfg,
            "drop_columns": drop,
        },
        batch_size=cfg.batch_rows,
        batch_format="pyarrow",
        compute=tokenize_pool,
        num_cpus=1,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(
        _ResolvedScore,
        fn_constructor_kwargs={"model": model_ref, "s3": s3, "cfg": cfg, "calls": calls},
        batch_size=cfg.batch_rows,
        batch_format="pyarrow",
        compute=pool,
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
        udf_modifying_row_count=False,
    )
    return ds


TRACE_ENV = "RERANK_RAY_TRACE_DIR"


class _CallTrace:
    """Per-call timings of a stage, for finding where a job's time goes.

    With ``RERANK_RAY_TRACE_DIR`` set in the workers' environment, every call of a tokenize or
    scoring actor appends one JSON line (stage, pid, start, end, rows) to
    ``<dir>/<stage>-<pid>.jsonl`` on its node, and each actor one ``<stage>_init`` line when
    its set-up is done: its process start (Ray worker start and imports come before
    ``start``), and the set-up itself (model resolve and load, autotune) from ``start`` to
    ``end``. Off (no file, no cost) when unset.
    """

    def __init__(self, stage: str) -> None:
        folder = os.environ.get(TRACE_ENV)
        self.path = os.path.join(folder, f"{stage}-{os.getpid()}.jsonl") if folder else None
        self.stage = stage
        self.created = time.time()
        if self.path:
            os.makedirs(folder, exist_ok=True)

    def _write(self, line: dict) -> None:
        import json

        with open(self.path, "a") as f:  # one short line per call; appends do not interleave
            f.write(json.dumps({"stage": self.stage, "pid": os.getpid(), **line}) + "\n")

    def ready(self, **details) -> None:
        """The actor's set-up is done (call at the end of ``__init__``); ``details`` (e.g.
        seconds per set-up step) go into its line."""
        if not self.path:
            return
        try:
            import psutil

            process_start = psutil.Process().create_time()
        except Exception:  # psutil comes with ray[default]; without it, no process start
            process_start = None
        self._write(
            {
                "stage": f"{self.stage}_init",
                "process_start": process_start,
                "start": self.created,
                "end": time.time(),
                "rows": 0,
                **details,
            }
        )

    def __call__(self, fn, batch):
        if not self.path:
            return fn(batch)
        start = time.time()
        out = fn(batch)
        self._write({"start": start, "end": time.time(), "rows": batch.num_rows})
        return out


class _ResolvedTokenize:
    """TokenizeStage with the model resolved on the node it runs on."""

    def __init__(self, model: str, s3: storage.S3Settings, cfg: JobConfig, drop_columns):
        self.trace = _CallTrace("tokenize")
        from rerank_ray.tokenize import TokenizeStage

        # The actor holds one CPU: the tokenizers library would otherwise start a thread per
        # core in every tokenize actor (12 actors x 16 threads on a 16-core node) and starve
        # the scoring actor's host thread. An explicit setting by the user is kept.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        local = _resolve_on_node(model, s3, cfg)
        self.stage = TokenizeStage(
            str(local),
            max_length=cfg.max_length,
            query_max_length=cfg.effective_query_max_length,
            drop_columns=drop_columns,
            trust_remote_code=cfg.trust_remote_code,
            cache_dir=str(cfg.model_cache_dir or storage.default_cache_dir()),
        )
        self.trace.ready()

    def __call__(self, batch):
        return self.trace(self.stage, batch)


class _ResolvedScore:
    """ScoreStage with the model resolved on the node it runs on."""

    def __init__(self, model: str, s3: storage.S3Settings, cfg: JobConfig, calls: int = 1):
        self.trace = _CallTrace("score")
        from rerank_ray.scorer import ScoreStage

        local = _resolve_on_node(model, s3, cfg)
        self.stage = ScoreStage(
            str(local),
            device=cfg.device,
            dtype=cfg.dtype,
            token_budget=cfg.token_budget,
            max_length=cfg.max_length,
            fast_gelu=cfg.fast_gelu,
            fused_kernels=cfg.fused_kernels,
            concurrent_calls=calls,
            allow_pickle_weights=cfg.allow_pickle_weights,
            trust_remote_code=cfg.trust_remote_code,
        )
        self.trace.ready(setup_seconds=self.stage.setup_seconds, load_path=self.stage.load_path)

    def __call__(self, batch):
        return self.trace(self.stage, batch)


def _resolve_on_node(model: str, s3: storage.S3Settings, cfg: JobConfig):
    return storage.resolve_model(
        model,
        s3=s3,
        revision=cfg.revision,
        cache_dir=cfg.model_cache_dir,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )


def _public_config(cfg: JobConfig) -> dict[str, Any]:
    """The config as written to the manifest. It holds no secrets: credentials never enter it."""
    return cfg.to_dict()


def summary_line(manifest: dict[str, Any]) -> str:
    """One line for the end of a run."""
    return (
        f"rerank-ray run {manifest['run_id']} committed: {manifest['rows_read']} rows read, "
        f"{manifest['rows_scored']} scored, {manifest['rows_rejected']} rejected "
        f"({manifest['rows_truncated']} truncated), {manifest['pairs_per_s']} pairs/s "
        f"end to end, {manifest['wall_time_s']} s -> {manifest['output']}"
    )

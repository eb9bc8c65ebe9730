"""Run the job: check up front, then read -> repartition -> tokenize -> score -> write.

``run`` does the up-front checks (input, output, model), takes the output lock, resumes what
an earlier attempt of the run id staged, builds the lazy Dataset (``build_dataset``) and
writes it through the sink, which commits the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rerank_ray import cluster, logs, rates, schema, source, storage
from rerank_ray.config import JobConfig
from rerank_ray.progress import Progress
from rerank_ray.report import RunReport
from rerank_ray.sink import (
    OutputLocation,
    RerankSink,
    ResumeState,
    acquire_lock,
    discard_staging,
    release_lock,
    repair,
    resume_state,
)
from rerank_ray.trace import CallTrace

log = logging.getLogger("rerank_ray")


def s3_settings(cfg: JobConfig) -> storage.S3Settings:
    """The job's S3 settings: its flags, else the AWS environment variables."""
    return storage.S3Settings.resolve(cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_verify_tls)


def output_location(cfg: JobConfig) -> OutputLocation:
    """The output root of a run (``cfg`` with its run id resolved)."""
    return OutputLocation(cfg.output, s3_settings(cfg), cfg.run_id)


def run(config: JobConfig, reserved_columns: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run a rerank job and return its manifest (also written as ``<output>/_SUCCESS``).

    ``reserved_columns``: columns a job mode adds after scoring (``modes.run``), refused up
    front as input columns. Everything that can be checked before scoring is checked first,
    so bad input, bad credentials or an unwritable output fail in seconds, not after the
    model has loaded.
    """
    t0 = time.time()
    cfg = config.with_defaults_resolved()
    s3 = s3_settings(cfg)
    out = OutputLocation(cfg.output, s3, cfg.run_id)
    if cfg.long_docs == "chunk":
        reserved_columns = (*reserved_columns, *schema.CHUNK_COLUMNS)
    plan = source.plan_source(cfg, s3, reserved_columns)
    out.check_writable()
    model_dir = _resolve_model(cfg, s3)
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
    lock = out.lock(cfg.effective_run_date, cfg.partition_by)
    acquire_lock(out, lock)
    try:
        repair(out)
        manifest = _score_and_commit(cfg, out, plan, fingerprint, t0)
    finally:
        release_lock(out, lock)
    print(summary_line(manifest), flush=True)
    return manifest


def _in_thread(fn, *args) -> Callable[[], Any]:
    """Start ``fn(*args)`` in a thread; the returned callable waits for its result
    (re-raising its exception)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=getattr(fn, "__name__", "work"))
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future.result


def _score_and_commit(cfg, out, plan, fingerprint, t0):
    """Resume what an earlier attempt of this run id staged, score the rest, commit."""
    import ray

    if not source.has_own_path_column(plan):
        resumed = resume_state(out, plan.rows_by_path())
    else:
        # Resume tracks each row's source file in Ray's `path` column, which an input
        # column of that name takes: such a run starts over.
        discard_staging(out)
        resumed = ResumeState()
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
    report: RunReport | None = None
    sink = RerankSink(
        out,
        run_date=cfg.effective_run_date,
        partition_by=cfg.partition_by,
        expected_rows=plan.num_rows,
        manifest_extra={
            "model": cfg.model,
            "input": cfg.input,
            "output": cfg.output,
            "input_files": len(plan.paths),
            # The config holds no secrets: credentials never enter it.
            "config": cfg.to_dict(),
            "ray_version": ray.__version__,
        },
        reject_columns=[cfg.column_map.get(c, c) for c in plan.schema.names],
        resumed=resumed,
        rows_per_file=cfg.rows_per_file,
        chunked=cfg.long_docs == "chunk",
        # At commit: the weights' hash (joined then) and the run's metrics.
        late_manifest_extra=lambda: {
            "weights_sha256": fingerprint(),
            **(report.manifest_part() if report is not None else {}),
        },
    )
    sink.started = t0
    if not todo:
        return sink.commit([])
    checked = time.time()
    logs.quiet_ray_logs()
    cluster.init_ray(cfg)
    _set_ray_progress(logs.OUTPUT.ray_progress)
    report = RunReport(cfg.run_id, t0, {"checks_done": checked, "ray_ready": time.time()})
    try:
        return _write(cfg, plan, out, todo, sink, report, resumed.rows)
    finally:
        report.close()


def _write(cfg, plan, out, todo, sink, report, resumed_rows):
    """Build the Dataset, write it through the sink (which commits), write the report and
    remember the stages' rates for the next run of this model."""
    pools = cluster.plan_pools(cfg, rows=plan.num_rows - resumed_rows)
    report.note("tokenize_pool", pools.tokenize_plan())
    report.note("batch_rows", pools.batch_rows)
    ds = build_dataset(cfg, plan, out.s3, paths=todo, pools=pools)
    progress = None
    if logs.OUTPUT.progress_line:
        total = plan.num_rows - resumed_rows
        interactive = logs.OUTPUT.stderr_tty
        progress = Progress(total, report.progress, interactive=interactive).start()
    try:
        report.mark("dataset_started")
        ds.write_datasink(sink)
    except Exception as err:
        # A data page that does not decode fails a read task, and Ray's error names no file.
        source.raise_if_unreadable(plan, todo, cfg.run_id, err)
        raise
    finally:
        if progress is not None:
            progress.stop()
    if sink.manifest is None:
        raise RuntimeError("The write finished without committing a manifest.")
    report.write(out, sink.manifest)
    rates.remember_rates(rates.cache_path(cfg), pools.rates_key, sink.manifest.get("metrics"))
    return sink.manifest


def _set_ray_progress(on: bool) -> None:
    """Ray Data's own progress bars (``--verbose``); the job draws its own line otherwise."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = on
    ctx.enable_operator_progress_bars = on


def build_dataset(
    cfg: JobConfig,
    plan: source.SourcePlan,
    s3: storage.S3Settings,
    paths: list[str] | None = None,
    pools: cluster.Pools | None = None,
):
    """The lazy Dataset graph: read -> repartition -> tokenize (CPU) -> score (GPU/CPU), on
    ``pools`` (planned for this cluster when not given)."""
    pools = pools or cluster.plan_pools(cfg, rows=plan.num_rows)
    ds = source.read_dataset(plan, cfg, paths)
    if dropped := _dropped_passthrough(cfg, plan):
        ds = ds.drop_columns(dropped)
    # The reader hands on a shard as one block, and a map stage emits one block per input
    # block: scoring would wait until a whole shard (of any size) was tokenized, and a few
    # large shards would spread unevenly over many GPUs. Streaming repartition (no barrier)
    # cuts blocks to batch_rows rows, so tokenized rows reach the GPUs a batch at a time.
    ds = ds.repartition(target_num_rows_per_block=pools.batch_rows)
    common = {"batch_size": pools.batch_rows, "batch_format": "pyarrow"}
    ds = ds.map_batches(
        TokenizeOnNode,
        fn_constructor_kwargs={"cfg": cfg, "s3": s3},
        compute=pools.tokenize,
        num_cpus=1,
        udf_modifying_row_count=False,
        **common,
    )
    # One GPU, or one CPU: Ray Data reserves a CPU for a GPU actor itself, and warns that
    # setting both is experimental (map_operator._canonicalize_ray_remote_args).
    resources = {"num_gpus": 1} if pools.use_gpu else {"num_cpus": 1}
    return ds.map_batches(
        ScoreOnNode,
        fn_constructor_kwargs={"cfg": cfg, "s3": s3, "calls": pools.scorer_calls},
        compute=pools.score,
        udf_modifying_row_count=False,
        **resources,
        **common,
    )


def _dropped_passthrough(cfg: JobConfig, plan: source.SourcePlan) -> list[str]:
    """Input columns (canonical names) that ``keep_columns`` leaves out, the ids and texts
    aside (the stages need them; the tokenize stage drops unkept texts itself)."""
    if cfg.keep_columns is None:
        return []
    return [c for c in plan.schema.names if c not in cfg.keep_columns and c not in cfg.column_map]


class NodeStage:
    """A tokenize or scoring stage built on the node it runs on (the model is resolved there:
    an s3:// model is downloaded once per node), each call traced (``trace.py``)."""

    kind = ""  # "tokenize" or "score": set by the two subclasses below

    def __init__(self, cfg: JobConfig, s3: storage.S3Settings, calls: int = 1):
        kind = self.kind
        # Model loading's progress bars would reach the driver's console from every actor.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        self.trace = CallTrace(kind, cfg.run_id)
        model_dir = str(_resolve_model(cfg, s3))
        cache_dir = str(cfg.model_cache_dir or storage.default_cache_dir())
        if kind == "tokenize":
            from rerank_ray.pairs import Chunking
            from rerank_ray.tokenize import TokenizeStage

            # The actor holds one CPU: the tokenizers library would otherwise start a thread
            # per core in every tokenize actor and starve the scoring actor's host thread. An
            # explicit setting by the user is kept.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            keep = set(cfg.keep_columns) if cfg.keep_columns is not None else None
            self.stage = TokenizeStage(
                model_dir,
                max_length=cfg.max_length,
                query_max_length=cfg.effective_query_max_length,
                drop_columns=tuple(
                    canon
                    for original, canon in cfg.column_map.items()
                    if canon in schema.TEXT_COLUMNS and keep is not None and original not in keep
                ),
                trust_remote_code=cfg.trust_remote_code,
                cache_dir=cache_dir,
                chunking=(
                    Chunking(cfg.chunk_overlap, cfg.max_chunks_per_doc)
                    if cfg.long_docs == "chunk"
                    else None
                ),
            )
            self.trace.ready()
        else:
            from rerank_ray.runners import RunnerOptions
            from rerank_ray.scorer import ScoreStage

            self.stage = ScoreStage(
                model_dir,
                RunnerOptions.from_job(cfg),
                max_length=cfg.max_length,
                token_budget=cfg.token_budget,
                concurrent_calls=calls,
                cache_dir=cache_dir,
                chunk_aggregate=cfg.chunk_aggregate if cfg.long_docs == "chunk" else None,
            )
            self.trace.attach_scorer(self.stage)
            self.trace.ready(setup_seconds=self.stage.setup_seconds, load_path=self.stage.load_path)

    def __call__(self, batch):
        return self.trace(self.stage, batch)


class TokenizeOnNode(NodeStage):
    """The tokenize stage (its own class, so Ray's actor names say which stage an actor runs)."""

    kind = "tokenize"


class ScoreOnNode(NodeStage):
    """The scoring stage (its own class, so Ray's actor names say which stage an actor runs)."""

    kind = "score"


def _resolve_model(cfg: JobConfig, s3: storage.S3Settings):
    return storage.resolve_model(
        cfg.model,
        s3=s3,
        revision=cfg.revision,
        cache_dir=cfg.model_cache_dir,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )


def summary_line(manifest: dict[str, Any]) -> str:
    """One line for the end of a run, with the manifest's counts: every row read comes out
    scored, rejected or (by a job mode) filtered; truncated rows are scored rows."""
    filtered = manifest.get("rows_filtered") or 0
    return (
        f"rerank-ray run {manifest['run_id']} committed: {manifest['rows_read']} rows read -> "
        f"{manifest['rows_scored']} scored ({manifest['rows_truncated']} truncated), "
        f"{manifest['rows_rejected']} rejected"
        + (f", {filtered} filtered" if filtered else "")
        + f"; {manifest['pairs_per_s']} scored pairs/s end to end, {manifest['wall_time_s']} s "
        f"-> {manifest['output']}"
    )

"""Run a job mode in two stages, each resumable: score the pairs, then the mode's per-query
step; commit both as one run, with the exports sharded and the statistics merged from
partials (the driver never holds the run's rows).

1. Scoring: a plain run into ``<output>/_scored/<run_id>/`` (no partitions). A killed
   attempt rerun with the same ``--run-id`` keeps the shards it had finished (the plain
   run's resume); once this stage has committed, a rerun does not score again.
2. Per-query step (``stage.py``): the scored rows hash-partitioned by query into blocks of
   whole queries; per block, the mode's rows, its export shards and partial statistics,
   staged under ``<output>/_staging/<run_id>/``. A killed attempt redoes this stage only.
   The scoring stage's rejected rows are carried over as they are.
3. Commit: the mode's rows and every export shard move into place and are listed in the
   manifest (a rerun replaces them); the partials merged on the driver make the report;
   then the scoring stage's files are deleted.

Layout of a run (every path starts with ``_`` except the rows, so readers skip it)::

    run_date=.../part-*.parquet, _rejects/   the mode's rows, as a plain run's
    _exports/<run_id>/report.json            the mode report (also _mode_report.json)
    _exports/<run_id>/flagembedding/train-00000.jsonl, ...           (labeling)
    _exports/<run_id>/sentence_transformers/<format>-00000.parquet, ... (labeling)
    _exports/<run_id>/sentence_transformers/distillation-00000.parquet, ... (labeling)
    _exports/<run_id>/score_histogram.png                           (labeling)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from rerank_ray import cluster, pipeline, schema, storage
from rerank_ray.config import JobConfig
from rerank_ray.modes.registry import LABELING, NIGHTLY, Mode
from rerank_ray.modes.stage import (
    BlockResult,
    Export,
    collect,
    merge_partials,
    process_block,
    whole_query_blocks,
)
from rerank_ray.sink import OutputLocation, RerankSink, acquire_lock, discard_staging, release_lock
from rerank_ray.sink.location import list_files, make_dirs, read_json, write_bytes
from rerank_ray.sink.records import Entry

log = logging.getLogger("rerank_ray")

MODE_REPORT_NAME = "_mode_report.json"
SCORED_DIR = "_scored"


def run_mode(mode: Mode, job: JobConfig, cfg: Any) -> dict[str, Any]:
    """Score, run the mode's per-query step, commit the rows and exports; write and return
    the mode report."""
    if mode.check is not None:
        mode.check(job, cfg)
    started = time.time()
    job = job.with_defaults_resolved()
    out = pipeline.output_location(job)
    lock = out.lock(job.effective_run_date, job.partition_by)
    acquire_lock(out, lock)
    try:
        scored_out, scored_now = _score(mode, job)
        manifest, merged, exported = _per_query(
            mode, job, cfg, out, scored_out, scored_now, started
        )
        report = _report_head(manifest, mode.name, cfg) | mode.finish(
            out, manifest, merged, exported, cfg
        )
        _write_report(out, report)
        _delete_scored(scored_out)
    finally:
        release_lock(out, lock)
    print(summary_line(mode.name, manifest, time.time() - started), flush=True)
    return report


def _score(mode: Mode, job: JobConfig) -> tuple[OutputLocation, bool]:
    """Stage 1 (see the module docstring): (its location, scored in this attempt?)."""
    scored_job = dataclasses.replace(
        job, output=storage.join(job.output, SCORED_DIR, job.run_id), partition_by=[]
    )
    scored_out = pipeline.output_location(scored_job)
    previous = read_json(scored_out.fs, scored_out.manifest)
    same_job = json.loads(json.dumps(scored_job.to_dict()))
    if previous is not None and previous.get("config") == same_job:
        log.info(
            "run %s: its scoring stage was committed by an earlier attempt (%d rows); "
            "not scoring again",
            job.run_id,
            previous["rows_read"],
        )
        return scored_out, False
    pipeline.run(scored_job, reserved_columns=mode.columns)
    return scored_out, True


def _per_query(mode, job, cfg, out, scored_out, scored_now, started):
    """Stage 2 and the commit; returns (manifest, merged partials, exports by name)."""
    import ray.data

    scored = read_json(scored_out.fs, scored_out.manifest)
    data = [scored_out.path(f) for f in scored["files"] if not f.startswith("_")]
    rejects = [scored_out.path(f) for f in scored["files"] if f.startswith(schema.REJECTS_DIR)]
    discard_staging(out)  # what an earlier attempt's per-query step staged
    sink = RerankSink(
        out,
        run_date=job.effective_run_date,
        partition_by=job.partition_by,
        expected_rows=scored["rows_read"],
        manifest_extra=_manifest_extra(mode, job, scored),
        reject_columns=_reject_columns(scored_out.fs, rejects or data),
        filtered_reasons=mode.filtered_reasons,
        rows_per_file=job.rows_per_file,
        late_manifest_extra=_scoring_counts(scored, scored_now, started),
    )
    sink.started = started
    results: list[BlockResult] = []
    if data:
        # The scoring stage's progress line ended at 100%: say what the wait is now.
        log.info(
            "run %s: %d rows scored; %s: grouping them by query and running the per-query step",
            job.run_id,
            scored["rows_scored"],
            mode.name,
        )
        cluster.init_ray(job)
        ds = ray.data.read_parquet(data, filesystem=scored_out.fs)
        column = mode.value_range_column(cfg)
        value_range = _value_range(ds, column) if column else None
        partitions = max(
            int(ray.cluster_resources().get("CPU", 1)),
            math.ceil(scored["rows_scored"] / job.rows_per_file),
        )
        ds = whole_query_blocks(ds, partitions).map_batches(
            process_block,
            batch_size=None,
            batch_format="pyarrow",
            fn_kwargs={
                "group": mode.group,
                "exports": mode.exports(cfg),
                "partials": functools.partial(mode.partials, value_range=value_range),
                "cfg": cfg,
                "sink": sink,
            },
        )
        results = collect(ds)
    carried = _carry_rejects(out, scored, rejects)
    exports_entry, exported = _number_exports(out, mode.exports(cfg), results)
    entries = [Entry(**e) for r in results for e in r.entries]
    manifest = sink.commit([carried, exports_entry, *entries])
    return manifest, merge_partials(results), exported


def _manifest_extra(mode: Mode, job: JobConfig, scored: dict[str, Any]) -> dict[str, Any]:
    keep = ("model", "input", "input_files", "ray_version", "weights_sha256")
    return {
        **{k: scored[k] for k in keep if k in scored},
        "output": job.output,
        "mode": mode.name,
        # The config holds no secrets: credentials never enter it.
        "config": job.to_dict(),
    }


def _scoring_counts(
    scored: dict[str, Any], scored_now: bool, started: float
) -> Callable[[], dict[str, Any]]:
    """Manifest fields about the scoring, filled at commit time. They replace the sink's own
    (spread after them): the per-query step moves rows, the scoring stage is what resumes."""
    this_attempt = scored["rows_processed_this_attempt"] if scored_now else 0
    model_scored = round((scored["pairs_per_s"] or 0) * scored["wall_time_s"]) if scored_now else 0

    def counts() -> dict[str, Any]:
        wall = time.time() - started
        return {
            "rows_scored_by_model": scored["rows_scored"],
            "rows_resumed": scored["rows_read"] - this_attempt,
            "rows_processed_this_attempt": this_attempt,
            "pairs_per_s": round(model_scored / wall, 2) if wall > 0 else None,
        }

    return counts


def _reject_columns(fs, files: list[str]) -> list[str] | None:
    """Columns of the rows the mode marks (duplicates): those of the scoring stage's rejects
    (input columns), so every file under ``_rejects/`` has one schema."""
    if not files:
        return None
    names = pq.read_schema(files[0], filesystem=fs).names
    return [n for n in names if n not in schema.OUTPUT_COLUMNS and n != schema.REJECT_REASON]


def _value_range(ds, column: str) -> tuple[float, float] | None:
    """The run-wide (min, max) of ``column``, so the blocks' histograms share their bins."""
    from ray.data.aggregate import Max, Min

    bounds = ds.select_columns([column]).aggregate(Min(column), Max(column))
    low, high = bounds[f"min({column})"], bounds[f"max({column})"]
    return None if low is None or high is None else (float(low), float(high))


def _carry_rejects(out: OutputLocation, scored: dict[str, Any], files: list[str]) -> Entry:
    """Copy the scoring stage's rejected rows into this run's staging, as one entry."""
    fs = out.fs
    target_dir = storage.join(out.staging, schema.REJECTS_DIR)
    make_dirs(fs, target_dir)
    copies = []
    for path in files:
        copy = storage.join(target_dir, path.rsplit("/", 1)[1])
        fs.copy_file(path, copy)  # a copy: a rerun after a failed commit still has them
        copies.append(copy)
    return Entry(
        source=None,
        rejected=scored["rows_rejected"],
        reasons=dict(scored["rejects_by_reason"]),
        files=copies,
    )


def _number_exports(
    out: OutputLocation, exports: tuple[Export, ...], results: list[BlockResult]
) -> tuple[Entry, dict[str, dict[str, Any]]]:
    """Rename the staged export shards ``<stem>-00000`` ... in the blocks' order; returns
    their entry (no rows) and, per export, the committed paths and row count."""
    staged_dir = storage.join(out.staging, out.relative(out.exports))
    entry, exported = Entry(source=None), {}
    for export in exports:
        shards = [r.exports[export.name] for r in results if export.name in r.exports]
        files, rows = [], 0
        for number, (path, count) in enumerate(shards):
            numbered = export.shard(staged_dir, f"{number:05d}")
            out.move(path, numbered)
            entry.files.append(numbered)
            files.append(out.relative(export.shard(out.exports, f"{number:05d}")))
            rows += count
        exported[export.name] = {"files": files, "rows": rows}
    return entry, exported


def _delete_scored(scored_out: OutputLocation) -> None:
    """Delete the scoring stage's files (and ``_scored/`` when no other run has any)."""
    scored_out.delete_tree(scored_out.base)
    parent = scored_out.base.rsplit("/", 1)[0]
    if not scored_out.is_s3 and not list_files(scored_out.fs, parent):
        with contextlib.suppress(OSError):  # another run's files appeared meanwhile
            os.rmdir(parent)


def _report_head(manifest: dict[str, Any], mode: str, cfg) -> dict[str, Any]:
    return {
        "mode": mode,
        "run_id": manifest["run_id"],
        "run_date": manifest["run_date"],
        "mode_config": cfg.__dict__.copy(),
        **{
            k: manifest[k]
            for k in (
                "rows_read",
                "rows_scored_by_model",
                "rows_scored",
                "rows_rejected",
                "rejects_by_reason",
                "rows_filtered",
                "filtered_by_reason",
                "rows_resumed",
            )
        },
    }


def _write_report(out: OutputLocation, report: dict[str, Any]) -> None:
    body = json.dumps(report, indent=2, default=float).encode()
    for path in (storage.join(out.exports, "report.json"), out.path(MODE_REPORT_NAME)):
        write_bytes(out.fs, path, body)
    log.info("mode report of run %s written under %s", out.run_id, out.display(out.exports))


def summary_line(mode: str, manifest: dict[str, Any], wall: float) -> str:
    """One line for the end of a mode run: what the model scored, what the mode kept."""
    filtered = ", ".join(f"{n} {r}" for r, n in manifest["filtered_by_reason"].items())
    return (
        f"rerank-ray {mode} run {manifest['run_id']} committed: {manifest['rows_read']} rows "
        f"read, {manifest['rows_scored_by_model']} scored by the model "
        f"({manifest['rows_resumed']} kept from an earlier attempt), "
        f"{manifest['rows_rejected']} rejected, {manifest['rows_filtered']} filtered"
        f"{f' ({filtered})' if filtered else ''}, {manifest['rows_scored']} rows written; "
        f"{manifest['pairs_per_s']} pairs/s scored end to end, {wall:.1f} s -> "
        f"{manifest['output']}"
    )


def run_nightly(job: JobConfig, cfg) -> dict[str, Any]:
    """Score, keep each query's top-k, commit; return the mode report (also written)."""
    return run_mode(NIGHTLY, job, cfg)


def run_labeling(job: JobConfig, cfg) -> dict[str, Any]:
    """Score, label, commit the labeled pairs and the exports; return the report."""
    return run_mode(LABELING, job, cfg)

"""Run a job mode: the scoring pipeline with the mode's per-query transform, then the mode's
report and exports, built by reading back the rows the run committed.

    nightly:  pipeline.run(cfg, transform) -> read back -> <output>/_exports/<run_id>/report.json
    labeling: pipeline.run(cfg, transform) -> read back -> report.json, score_histogram.png,
              flagembedding/train.jsonl, sentence_transformers/{triplets,distillation}.parquet

The report of the latest run is also written to ``<output>/_mode_report.json``. Every path
starts with ``_``, so readers of the partitioned output (pyarrow.dataset, DuckDB) skip it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from rerank_ray import pipeline, schema, storage
from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.modes import exports
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.groups import labeling_group, nightly_group
from rerank_ray.modes.labeling import label_stats
from rerank_ray.modes.ranking import nightly_stats
from rerank_ray.modes.report import histogram_png, score_report

log = logging.getLogger("rerank_ray")

EXPORTS_DIR = "_exports"
MODE_REPORT_NAME = "_mode_report.json"


def per_query(fn: Callable[[pa.Table], pa.Table]) -> Callable[[Any], Any]:
    """A Dataset transform applying ``fn`` to each query's rows, across all shards."""

    def transform(ds):
        import ray

        # One shuffle partition per CPU: Ray's default (200) makes 200 write tasks and as
        # many small files per partition, whatever the data size.
        partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
        grouped = ds.groupby(schema.QUERY_ID, num_partitions=partitions)
        return grouped.map_groups(fn, batch_format="pyarrow")

    return transform


def run_nightly(job: JobConfig, cfg: NightlyConfig) -> dict[str, Any]:
    """Score, keep each query's top-k, commit; return the mode report (also written)."""
    job = job.with_defaults_resolved()
    manifest = pipeline.run(
        job,
        transform=per_query(lambda table: nightly_group(table, cfg)),
        filtered_reasons=(schema.RejectReason.BELOW_TOP_K,),
    )
    fs, base = storage.resolve(job.output, pipeline.s3_settings(job))
    table = read_committed(fs, base, manifest)
    stats = nightly_stats(table, cfg.effective_overlap_k)
    report = _report_head(manifest, "nightly", cfg) | {"stats": stats.to_dict()}
    _write_report(fs, base, manifest["run_id"], report)
    return report


def run_labeling(job: JobConfig, cfg: LabelConfig) -> dict[str, Any]:
    """Score, label, commit the labeled pairs; write the exports and the report."""
    missing = [c for c in (schema.QUERY, schema.DOC) if not _kept(job, c)]
    if missing:
        raise ConfigError(
            f"Labeling exports need the text columns {missing}, but keep_columns drops them; "
            "add them to keep_columns or leave keep_columns unset."
        )
    job = job.with_defaults_resolved()
    manifest = pipeline.run(job, transform=per_query(lambda table: labeling_group(table, cfg)))
    fs, base = storage.resolve(job.output, pipeline.s3_settings(job))
    table = read_committed(fs, base, manifest)
    run_dir = storage.join(base, EXPORTS_DIR, manifest["run_id"])
    paths = {
        "flagembedding_jsonl": storage.join(run_dir, "flagembedding", "train.jsonl"),
        "triplets_parquet": storage.join(run_dir, "sentence_transformers", "triplets.parquet"),
        "distillation_parquet": storage.join(
            run_dir, "sentence_transformers", "distillation.parquet"
        ),
        "score_histogram_png": storage.join(run_dir, "score_histogram.png"),
    }
    _make_dirs(fs, *{p.rsplit("/", 1)[0] for p in paths.values()})

    records = exports.write_jsonl(
        exports.flagembedding_records(table, cfg), paths["flagembedding_jsonl"], fs
    )
    triplets = exports.sentence_transformers_triplets(table, cfg)
    exports.write_parquet(triplets, paths["triplets_parquet"], fs)
    distillation = exports.sentence_transformers_distillation(table, cfg)
    exports.write_parquet(distillation, paths["distillation_parquet"], fs)
    value_range = None
    if cfg.score_column == schema.SCORE:
        low_high = pc.min_max(table[schema.SCORE])
        value_range = (low_high["min"].as_py(), low_high["max"].as_py())
    scores = score_report(table, cfg, value_range)
    with fs.open_output_stream(paths["score_histogram_png"]) as out:
        out.write(histogram_png(scores, cfg))

    counts = {
        "flagembedding_jsonl": records,
        "triplets_parquet": triplets.num_rows,
        "distillation_parquet": distillation.num_rows,
    }
    report = _report_head(manifest, "labeling", cfg) | {
        "stats": label_stats(table).to_dict(),
        "exports": {
            name: {"path": _rel(base, path), "rows": counts.get(name)}
            for name, path in paths.items()
        },
        "score_report": scores.to_dict(),
    }
    _write_report(fs, base, manifest["run_id"], report)
    return report


def read_committed(fs: pafs.FileSystem, base: str, manifest: dict[str, Any]) -> pa.Table:
    """The scored rows this run committed (its manifest's files, not older runs' ones)."""
    files = [
        storage.join(base, f)
        for f in manifest["files"]
        if not f.startswith("_") and f.endswith(".parquet")
    ]
    if not files:
        return pa.table({})
    dataset = pads.dataset(
        files, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=base
    )
    return dataset.to_table()


def _report_head(manifest: dict[str, Any], mode: str, cfg) -> dict[str, Any]:
    return {
        "mode": mode,
        "run_id": manifest["run_id"],
        "run_date": manifest["run_date"],
        "mode_config": cfg.__dict__.copy(),
        "rows_read": manifest["rows_read"],
        "rows_scored": manifest["rows_scored"],
        "rows_rejected": manifest["rows_rejected"],
        "rejects_by_reason": manifest["rejects_by_reason"],
    }


def _write_report(fs: pafs.FileSystem, base: str, run_id: str, report: dict[str, Any]) -> None:
    body = json.dumps(report, indent=2, default=float).encode()
    run_dir = storage.join(base, EXPORTS_DIR, run_id)
    _make_dirs(fs, run_dir)
    for path in (storage.join(run_dir, "report.json"), storage.join(base, MODE_REPORT_NAME)):
        with fs.open_output_stream(path) as out:
            out.write(body)
    log.info("mode report of run %s written under %s", run_id, run_dir)


def _make_dirs(fs: pafs.FileSystem, *paths: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories to create
        for path in paths:
            fs.create_dir(path, recursive=True)


def _kept(job: JobConfig, canonical: str) -> bool:
    if job.keep_columns is None:
        return True
    original = {v: k for k, v in job.column_map.items()}[canonical]
    return original in job.keep_columns


def _rel(base: str, path: str) -> str:
    return path[len(base) + 1 :]

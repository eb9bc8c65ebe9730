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
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rerank_ray import pipeline, schema, storage
from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.modes import exports
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.groups import labeling_group, nightly_group
from rerank_ray.modes.labeling import MODE_FIELDS, label_stats
from rerank_ray.modes.ranking import RANK_COLUMNS, nightly_stats
from rerank_ray.modes.report import histogram_png, score_report
from rerank_ray.sink.location import OutputLocation, make_dirs, write_bytes

log = logging.getLogger("rerank_ray")

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


@dataclass(frozen=True)
class Mode:
    """A job mode as data: its typed config, what each query group becomes inside the
    pipeline, the rows it leaves out on purpose, and what it builds from the committed run."""

    name: str
    config_cls: type
    description: str
    group: Callable[[pa.Table, Any], pa.Table]  # one query's rows -> as many rows, marked
    finish: Callable[[OutputLocation, dict[str, Any], pa.Table, Any], dict[str, Any]]
    filtered_reasons: tuple[str, ...] = ()
    check: Callable[[JobConfig, Any], None] | None = None  # before anything runs
    columns: tuple[str, ...] = ()  # the columns the mode adds (refused as input columns)


def run_mode(mode: Mode, job: JobConfig, cfg: Any) -> dict[str, Any]:
    """Score with the mode's per-query transform, commit, then write the mode's report (and
    exports) from the rows the run committed; returns the report."""
    if mode.check is not None:
        mode.check(job, cfg)
    job = job.with_defaults_resolved()
    manifest = pipeline.run(
        job,
        transform=per_query(lambda table: mode.group(table, cfg)),
        filtered_reasons=mode.filtered_reasons,
        reserved_columns=mode.columns,
    )
    out = pipeline.output_location(job)
    table = read_committed(out, manifest)
    report = _report_head(manifest, mode.name, cfg) | mode.finish(out, manifest, table, cfg)
    _write_report(out, report)
    return report


def _finish_nightly(out, manifest, table: pa.Table, cfg: NightlyConfig) -> dict[str, Any]:
    return {"stats": nightly_stats(table, cfg.effective_overlap_k).to_dict()}


def _check_labeling(job: JobConfig, cfg: LabelConfig) -> None:
    missing = [c for c in (schema.QUERY, schema.DOC) if not _kept(job, c)]
    if missing:
        raise ConfigError(
            f"Labeling exports need the text columns {missing}, but keep_columns drops them; "
            "add them to keep_columns or leave keep_columns unset."
        )


def _finish_labeling(out, manifest, table: pa.Table, cfg: LabelConfig) -> dict[str, Any]:
    fs, run_dir = out.fs, out.exports
    paths = {
        "flagembedding_jsonl": storage.join(run_dir, "flagembedding", "train.jsonl"),
        "triplets_parquet": storage.join(run_dir, "sentence_transformers", "triplets.parquet"),
        "distillation_parquet": storage.join(
            run_dir, "sentence_transformers", "distillation.parquet"
        ),
        "score_histogram_png": storage.join(run_dir, "score_histogram.png"),
    }
    make_dirs(fs, *{p.rsplit("/", 1)[0] for p in paths.values()})
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
    with fs.open_output_stream(paths["score_histogram_png"]) as stream:
        stream.write(histogram_png(scores, cfg))
    counts = {
        "flagembedding_jsonl": records,
        "triplets_parquet": triplets.num_rows,
        "distillation_parquet": distillation.num_rows,
    }
    return {
        "stats": label_stats(table).to_dict(),
        "exports": {
            name: {"path": out.relative(path), "rows": counts.get(name)}
            for name, path in paths.items()
        },
        "score_report": scores.to_dict(),
    }


NIGHTLY = Mode(
    name="nightly",
    config_cls=NightlyConfig,
    description="Nightly rerank: rank every query, keep the top K.",
    group=nightly_group,
    finish=_finish_nightly,
    filtered_reasons=(schema.RejectReason.BELOW_TOP_K,),
    columns=RANK_COLUMNS,
)
LABELING = Mode(
    name="labeling",
    config_cls=LabelConfig,
    description="Training-data labeling: labels, hard negatives, FlagEmbedding / "
    "sentence-transformers exports and a score report.",
    group=labeling_group,
    finish=_finish_labeling,
    check=_check_labeling,
    columns=tuple(f.name for f in MODE_FIELDS),
)
MODES = {mode.name: mode for mode in (NIGHTLY, LABELING)}


def run_nightly(job: JobConfig, cfg: NightlyConfig) -> dict[str, Any]:
    """Score, keep each query's top-k, commit; return the mode report (also written)."""
    return run_mode(NIGHTLY, job, cfg)


def run_labeling(job: JobConfig, cfg: LabelConfig) -> dict[str, Any]:
    """Score, label, commit the labeled pairs; write the exports and the report."""
    return run_mode(LABELING, job, cfg)


def read_committed(out: OutputLocation, manifest: dict[str, Any]) -> pa.Table:
    """The scored rows this run committed (its manifest's files, not older runs' ones)."""
    files = [
        out.path(f) for f in manifest["files"] if not f.startswith("_") and f.endswith(".parquet")
    ]
    if not files:
        return pa.table({})
    dataset = pads.dataset(
        files, filesystem=out.fs, format="parquet", partitioning="hive", partition_base_dir=out.base
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


def _write_report(out: OutputLocation, report: dict[str, Any]) -> None:
    body = json.dumps(report, indent=2, default=float).encode()
    for path in (storage.join(out.exports, "report.json"), out.path(MODE_REPORT_NAME)):
        write_bytes(out.fs, path, body)
    log.info("mode report of run %s written under %s", out.run_id, out.display(out.exports))


def _kept(job: JobConfig, canonical: str) -> bool:
    if job.keep_columns is None:
        return True
    original = {v: k for k, v in job.column_map.items()}[canonical]
    return original in job.keep_columns

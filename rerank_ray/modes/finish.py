"""What each mode builds from its rows besides the rows: its exports and partial statistics
(per block of whole queries, on the workers) and its report (from the merged partials, on
the driver), with a loud warning when a labeling run exports nothing."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from rerank_ray import schema, storage
from rerank_ray.config import JobConfig
from rerank_ray.modes import exports
from rerank_ray.modes.config import LabelConfig, NightlyConfig
from rerank_ray.modes.labeling import LabelStats, label_stats
from rerank_ray.modes.ranking import nightly_stats
from rerank_ray.modes.report import ScoreReport, histogram_png, score_report
from rerank_ray.modes.stage import Export, ValueRange
from rerank_ray.sink.location import make_dirs
from rerank_ray.typed_config import ConfigError

log = logging.getLogger("rerank_ray")

FLAGEMBEDDING = "flagembedding_jsonl"
HARD_NEGATIVES = "hard_negatives_parquet"
DISTILLATION = "distillation_parquet"
HISTOGRAM = "score_histogram_png"


def _counts(manifest: dict[str, Any]) -> dict[str, int]:
    """The row counts every mode's stats carry, as the manifest has them: pairs the model
    scored, rows rejected (before the mode, and duplicates) and left out on purpose."""
    return {
        "rows_scored_by_model": manifest["rows_scored_by_model"],
        "rejected_rows": manifest["rows_rejected"],
        "filtered_rows": manifest["rows_filtered"],
    }


# --- nightly ----------------------------------------------------------------------------------
def nightly_partials(rows: pa.Table, cfg: NightlyConfig, value_range=None) -> dict[str, Any]:
    """Per block: the statistics of its queries' top-k rows."""
    return {"stats": nightly_stats(rows, cfg.effective_overlap_k)}


def nightly_finish(out, manifest, merged, exported, cfg: NightlyConfig) -> dict[str, Any]:
    """The nightly report's statistics."""
    stats = merged.get("stats") or nightly_stats(pa.table({}), cfg.effective_overlap_k)
    return {"stats": stats.to_dict() | _counts(manifest)}


# --- labeling ---------------------------------------------------------------------------------
def check_labeling(job: JobConfig, cfg: LabelConfig) -> None:
    """The exports need the query and document texts."""
    kept = job.keep_columns
    original = {v: k for k, v in job.column_map.items()}
    missing = [
        c for c in (schema.QUERY, schema.DOC) if kept is not None and original[c] not in kept
    ]
    if missing:
        raise ConfigError(
            f"Labeling exports need the text columns {missing}, but keep_columns drops them; "
            "add them to keep_columns or leave keep_columns unset."
        )


def labeling_exports(cfg: LabelConfig) -> tuple[Export, ...]:
    """FlagEmbedding JSONL, the sentence-transformers format chosen, distillation rows."""
    stem = exports.HARD_NEGATIVE_STEMS[cfg.hard_negative_format]
    return (
        Export(FLAGEMBEDDING, "flagembedding/train.jsonl", _flagembedding),
        Export(HARD_NEGATIVES, f"sentence_transformers/{stem}.parquet", exports.hard_negative_rows),
        Export(
            DISTILLATION,
            "sentence_transformers/distillation.parquet",
            exports.sentence_transformers_distillation,
        ),
    )


def _flagembedding(rows: pa.Table, cfg: LabelConfig) -> list[dict]:
    return list(exports.flagembedding_records(rows, cfg))


def labeling_range_column(cfg: LabelConfig) -> str | None:
    """Raw scores have no fixed axis: the report's bins span the run's range of them."""
    return cfg.score_column if cfg.score_column == schema.SCORE else None


def labeling_partials(rows: pa.Table, cfg: LabelConfig, value_range=None) -> dict[str, Any]:
    """Per block: label counts, the score report and the range of the labeled score."""
    return {
        "stats": label_stats(rows),
        "score_report": score_report(rows, cfg, value_range),
        "range": ValueRange.of(rows, cfg.score_column),
    }


def labeling_finish(out, manifest, merged, exported, cfg: LabelConfig) -> dict[str, Any]:
    """Write the histogram; the report's stats, exports, score report and warnings."""
    stats: LabelStats = merged.get("stats", LabelStats())
    scores: ScoreReport | None = merged.get("score_report")
    value_range = merged.get("range", ValueRange())
    report: dict[str, Any] = {"stats": stats.to_dict() | _counts(manifest), "warnings": []}
    if scores is not None:
        path = storage.join(out.exports, "score_histogram.png")
        make_dirs(out.fs, out.exports)
        with out.fs.open_output_stream(path) as stream:
            stream.write(histogram_png(scores, cfg))
        exported = {**exported, HISTOGRAM: {"files": [out.relative(path)], "rows": None}}
        report["score_report"] = scores.to_dict()
    report["exports"] = exported
    if not exported.get(FLAGEMBEDDING, {}).get("rows"):
        warning = empty_export_warning(manifest, stats, value_range, cfg)
        log.warning("%s", warning)
        report["warnings"].append(warning)
    return report


def empty_export_warning(
    manifest: dict[str, Any], stats: LabelStats, value_range: ValueRange, cfg: LabelConfig
) -> str:
    """Why a labeling run exported no training record, with the numbers to fix it."""
    head = f"Run {manifest['run_id']} exported no training records"
    if not stats.rows:
        return (
            f"{head}: no pair was scored ({manifest['rows_rejected']} of "
            f"{manifest['rows_read']} rows rejected: {manifest['rejects_by_reason']})."
        )
    counts = (
        f"{stats.queries} queries, {stats.positives} positives, {stats.negatives} negatives, "
        f"{stats.hard_negatives} hard negatives"
    )
    seen = value_range.as_tuple()
    span = f"{seen[0]:.4g}..{seen[1]:.4g}" if seen else "all NaN"
    if cfg.label_source == "threshold":
        rule = (
            f"a positive needs {cfg.score_column} >= pos_threshold {cfg.pos_threshold} and a "
            f"negative <= neg_threshold {cfg.neg_threshold}, but {cfg.score_column} of the "
            f"{stats.rows} scored pairs ranged {span}"
        )
    else:
        rule = f"labels come from is_positive; {cfg.score_column} ranged {span}"
    return (
        f"{head}: none of its queries has both a positive and a hard negative ({counts}); "
        f"{rule}. Hard negatives also need a rank in {cfg.hard_negative_min_rank}.."
        f"{cfg.hard_negative_max_rank} and a score at least margin {cfg.margin} below the "
        "query's lowest positive. Choose thresholds from the report's threshold table and "
        "score_histogram.png."
    )

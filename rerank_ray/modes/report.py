"""The labeling run report: a score histogram (PNG) and per-threshold counts, so thresholds
can be chosen by looking. Counts are partial sums over whole queries (add with ``+``)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rerank_ray import schema
from rerank_ray.modes.config import LabelConfig
from rerank_ray.modes.ranking import split_rejected

DEFAULT_NORM_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


@dataclass(frozen=True)
class ScoreReport:
    """Histogram of ``column`` over scored rows, and for each threshold t the rows with a
    value >= t and <= t and the queries having at least one such row."""

    column: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    thresholds: tuple[float, ...]
    rows_at_or_above: tuple[int, ...]
    rows_at_or_below: tuple[int, ...]
    queries_with_row_at_or_above: tuple[int, ...]
    queries_with_row_at_or_below: tuple[int, ...]
    rows: int
    queries: int
    nan_rows: int

    def __add__(self, other: ScoreReport) -> ScoreReport:
        if (self.column, self.edges, self.thresholds) != (
            other.column,
            other.edges,
            other.thresholds,
        ):
            raise ValueError("Only reports with the same column, bins and thresholds add up.")

        def add(a: tuple, b: tuple) -> tuple[int, ...]:
            return tuple(int(x + y) for x, y in zip(a, b, strict=True))

        return ScoreReport(
            column=self.column,
            edges=self.edges,
            counts=add(self.counts, other.counts),
            thresholds=self.thresholds,
            rows_at_or_above=add(self.rows_at_or_above, other.rows_at_or_above),
            rows_at_or_below=add(self.rows_at_or_below, other.rows_at_or_below),
            queries_with_row_at_or_above=add(
                self.queries_with_row_at_or_above, other.queries_with_row_at_or_above
            ),
            queries_with_row_at_or_below=add(
                self.queries_with_row_at_or_below, other.queries_with_row_at_or_below
            ),
            rows=self.rows + other.rows,
            queries=self.queries + other.queries,
            nan_rows=self.nan_rows + other.nan_rows,
        )

    def threshold_rows(self) -> list[dict[str, float | int]]:
        """The per-threshold counts as a list of records (for JSON)."""
        return [
            {
                "threshold": t,
                "rows_at_or_above": a,
                "rows_at_or_below": b,
                "queries_with_row_at_or_above": qa,
                "queries_with_row_at_or_below": qb,
            }
            for t, a, b, qa, qb in zip(
                self.thresholds,
                self.rows_at_or_above,
                self.rows_at_or_below,
                self.queries_with_row_at_or_above,
                self.queries_with_row_at_or_below,
                strict=True,
            )
        ]

    def to_dict(self) -> dict:
        return {
            "column": self.column,
            "rows": self.rows,
            "queries": self.queries,
            "nan_rows": self.nan_rows,
            "histogram": {"edges": list(self.edges), "counts": list(self.counts)},
            "thresholds": self.threshold_rows(),
        }


def report_axes(
    cfg: LabelConfig, value_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, ...]]:
    """(bin edges, thresholds): fixed 0..1 for score_norm; over ``value_range`` for raw scores
    (needed then: take the observed min/max of the whole run so partial reports add up)."""
    if cfg.score_column == schema.SCORE_NORM:
        low, high = 0.0, 1.0
    elif value_range is None:
        raise ValueError("A raw-score report needs value_range=(min, max) of the whole run.")
    else:
        low, high = value_range
        if not high > low:
            high = low + 1.0  # every score equal: one unit-wide axis keeps the bins valid
    edges = np.linspace(low, high, cfg.histogram_bins + 1)
    if cfg.report_thresholds is not None:
        thresholds = tuple(float(t) for t in cfg.report_thresholds)
    elif cfg.score_column == schema.SCORE_NORM:
        thresholds = DEFAULT_NORM_THRESHOLDS
    else:
        thresholds = tuple(float(t) for t in np.linspace(low, high, 21)[1:-1])
    return edges, thresholds


def score_report(
    table: pa.Table, cfg: LabelConfig, value_range: tuple[float, float] | None = None
) -> ScoreReport:
    """Report over the scored rows of ``table`` (whole queries; rejected rows ignored)."""
    edges, thresholds = report_axes(cfg, value_range)
    scored, _ = split_rejected(table)
    # Kept in the column's own precision, compared with thresholds in that precision (as labels).
    values = scored[cfg.score_column].to_numpy()
    finite = ~np.isnan(values)
    # Values outside the axis are clipped into the end bins so every row is counted once.
    counts, _ = np.histogram(np.clip(values[finite], edges[0], edges[-1]), bins=edges)
    per_query = (
        # NaN as null, so a query's min/max skips it (an all-NaN query has null min/max).
        pa.table({"q": scored[schema.QUERY_ID], "v": pa.array(values, from_pandas=True)})
        .group_by("q")
        .aggregate([("v", "max"), ("v", "min")])
    )
    q_max = per_query["v_max"].to_numpy(zero_copy_only=False)
    q_min = per_query["v_min"].to_numpy(zero_copy_only=False)
    return ScoreReport(
        column=cfg.score_column,
        edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        thresholds=thresholds,
        rows_at_or_above=_count_at_or_above(values[finite], thresholds),
        rows_at_or_below=_count_at_or_below(values[finite], thresholds),
        queries_with_row_at_or_above=_count_at_or_above(q_max[~np.isnan(q_max)], thresholds),
        queries_with_row_at_or_below=_count_at_or_below(q_min[~np.isnan(q_min)], thresholds),
        rows=int(finite.sum()),
        queries=per_query.num_rows,
        nan_rows=int((~finite).sum()),
    )


def _count_at_or_above(values: np.ndarray, thresholds: tuple[float, ...]) -> tuple[int, ...]:
    ordered = np.sort(values)
    below = np.searchsorted(ordered, np.asarray(thresholds, dtype=values.dtype), side="left")
    return tuple(int(len(ordered) - b) for b in below)


def _count_at_or_below(values: np.ndarray, thresholds: tuple[float, ...]) -> tuple[int, ...]:
    ordered = np.sort(values)
    at_or_below = np.searchsorted(ordered, np.asarray(thresholds, dtype=values.dtype), side="right")
    return tuple(int(c) for c in at_or_below)


def histogram_png(report: ScoreReport, cfg: LabelConfig) -> bytes:
    """The histogram as PNG bytes, with the configured thresholds drawn as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on workers or CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "The labeling report's histogram needs matplotlib: pip install matplotlib."
        ) from None
    edges = np.asarray(report.edges)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        ax.bar(edges[:-1], report.counts, width=np.diff(edges), align="edge", color="#4c72b0")
        if cfg.label_source == "threshold":
            ax.axvline(cfg.pos_threshold, color="#2ca02c", ls="--", label="pos_threshold")
            ax.axvline(cfg.neg_threshold, color="#d62728", ls="--", label="neg_threshold")
            ax.legend()
        ax.set_xlabel(report.column)
        ax.set_ylabel("pairs")
        ax.set_title(f"{report.column} of {report.rows} scored pairs, {report.queries} queries")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()

"""The job's Ray metrics (``ray.util.metrics``): one table of names, made in the actors.

Ray exports them to Prometheus with a ``ray_`` prefix (``ray_rerank_pairs_scored``), so the
Ray dashboard's Grafana, or any Prometheus scraping the cluster, shows a job live. Every
metric carries the ``run_id`` tag; ``rerank_rows_rejected`` also ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seconds; spans a small CPU micro-batch to a large GPU one.
LATENCY_BOUNDARIES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (before Ray's ``ray_`` prefix), kind, help text and tags."""

    name: str
    kind: str  # "counter", "histogram" or "gauge"
    description: str
    tags: tuple[str, ...] = ("run_id",)


METRICS = (
    MetricSpec("rerank_pairs_scored", "counter", "Pairs given a score by a scoring actor."),
    MetricSpec("rerank_tokens_scored", "counter", "Tokens in the pairs scored (no padding)."),
    MetricSpec(
        "rerank_rows_rejected",
        "counter",
        "Rows rejected by the tokenize stage, by reason.",
        ("run_id", "reason"),
    ),
    MetricSpec(
        "rerank_forward_latency_s",
        "histogram",
        "Seconds per micro-batch forward pass, to its scores on the host.",
    ),
    MetricSpec("rerank_oom_backoffs", "counter", "Token budget halvings after CUDA OOM."),
    MetricSpec(
        "rerank_gpu_utilization",
        "gauge",
        "GPU utilisation (percent) sampled by NVML in a scoring actor.",
        ("run_id", "actor"),
    ),
)


class RayMetrics:
    """The metrics of ``METRICS`` for one run, made in a Ray worker (no-ops elsewhere)."""

    def __init__(self, run_id: str) -> None:
        from ray.util import metrics

        kinds = {"counter": metrics.Counter, "histogram": metrics.Histogram, "gauge": metrics.Gauge}
        self._metrics = {}
        for spec in METRICS:
            extra = {"boundaries": list(LATENCY_BOUNDARIES)} if spec.kind == "histogram" else {}
            metric = kinds[spec.kind](spec.name, spec.description, tag_keys=spec.tags, **extra)
            metric.set_default_tags({"run_id": run_id})
            self._metrics[spec.name] = metric

    def inc(self, name: str, value: float, **tags: str) -> None:
        """Add ``value`` (> 0) to the counter ``name``."""
        if value > 0:
            self._metrics[name].inc(value, tags=tags or None)

    def observe(self, name: str, value: float) -> None:
        """One observation of the histogram ``name``."""
        self._metrics[name].observe(value)

    def set(self, name: str, value: float, **tags: str) -> None:
        """Set the gauge ``name``."""
        self._metrics[name].set(value, tags=tags or None)

"""The job's Ray metrics are accepted by Ray in a worker (names, tags, histogram boundaries)
and take values of every kind."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_metrics_register_and_record_in_a_worker(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def record() -> list[str]:
        from rerank_ray.metrics import RayMetrics

        m = RayMetrics("test-run")
        m.inc("rerank_pairs_scored", 10)
        m.inc("rerank_tokens_scored", 500)
        m.inc("rerank_rows_rejected", 2, reason="empty_doc")
        m.inc("rerank_oom_backoffs", 1)
        m.observe("rerank_forward_latency_s", 0.03)
        m.set("rerank_gpu_utilization", 87.0, actor="node:1")
        return sorted(m._metrics)

    from rerank_ray.metrics import METRICS

    assert ray.get(record.remote()) == sorted(s.name for s in METRICS)

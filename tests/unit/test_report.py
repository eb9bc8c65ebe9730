"""The run report without Ray: aggregates of call records, the throughput series, the drawn
report, the progress line, the timed runner and the stderr line filter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rerank_ray import logs
from rerank_ray.progress import Progress, format_line
from rerank_ray.report.collect import RunMetrics
from rerank_ray.report.render import render, startup_phases
from rerank_ray.trace import TimedRunner

T0 = 1_000.0


def _records():
    """Two tokenize calls (one with rejects), three scoring calls on two actors, a write."""
    return [
        {
            "stage": "score_init",
            "actor": "n:1",
            "process_start": T0 + 1,
            "start": T0 + 2,
            "end": T0 + 5,
            "rows": 0,
            "setup_seconds": {"load_model": 2.0, "autotune": 1.0},
            "token_budget": 4096,
            "gpu_name": None,
            "gpu_status": "no GPU",
        },
        {
            "stage": "tokenize",
            "actor": "n:2",
            "start": T0 + 5,
            "end": T0 + 6,
            "rows": 100,
            "rejects": {"empty_text": 3},
        },
        {
            "stage": "tokenize",
            "actor": "n:2",
            "start": T0 + 6,
            "end": T0 + 7,
            "rows": 100,
            "rejects": {},
        },
        {
            "stage": "score",
            "actor": "n:1",
            "start": T0 + 6,
            "end": T0 + 8,
            "rows": 100,
            "pairs": 97,
            "tokens": 970,
            "latencies_ms": [10.0, 20.0],
            "token_budget": 4096,
            "oom_backoffs": 0,
            "peak_memory_mib": 10.0,
            "gpu_samples": [],
            "gpu_status": "no GPU",
        },
        {
            "stage": "score",
            "actor": "n:1",
            "start": T0 + 9,
            "end": T0 + 10,
            "rows": 50,
            "pairs": 50,
            "tokens": 500,
            "latencies_ms": [30.0],
            "token_budget": 2048,
            "oom_backoffs": 1,
            "peak_memory_mib": 12.0,
            "gpu_samples": [],
            "gpu_status": "no GPU",
        },
        {
            "stage": "score",
            "actor": "n:3",
            "start": T0 + 7,
            "end": T0 + 8,
            "rows": 50,
            "pairs": 50,
            "tokens": 500,
            "latencies_ms": [40.0],
            "token_budget": 4096,
            "oom_backoffs": 0,
            "peak_memory_mib": None,
            "gpu_samples": [],
            "gpu_status": "no GPU",
        },
        {"stage": "write", "actor": "n:4", "start": T0 + 10, "end": T0 + 11, "rows": 200},
    ]


def _metrics():
    m = RunMetrics(T0, {"ray_ready": T0 + 0.5})
    for rec in _records():
        m.add(rec)
    return m


def test_summary_sums_calls_per_stage_and_actor():
    s = _metrics().summary(T0 + 12)
    assert s["stages"]["tokenize"]["rows"] == 200
    assert s["stages"]["tokenize"]["rejects"] == {"empty_text": 3}
    score = s["stages"]["score"]
    assert (score["rows"], score["pairs"], score["tokens"], score["calls"]) == (200, 197, 1970, 3)
    # Busy: 2 + 1 s on n:1, 1 s on n:3; the span is T0+6 .. T0+10.
    assert score["busy_s"] == 4.0
    assert score["busy_fraction"] == round(4.0 / (2 * 4.0), 3)
    n1 = next(a for a in s["actors"] if a["actor"] == "n:1")
    assert (n1["token_budget_start"], n1["token_budget"], n1["oom_backoffs"]) == (4096, 2048, 1)
    assert n1["peak_memory_mib"] == 12.0
    assert n1["forward_latency_ms"]["p50"] == 20.0
    assert s["forward_latency_ms"]["micro_batches"] == 4
    assert s["forward_latency_ms"]["p95"] == pytest.approx(np.percentile([10, 20, 30, 40], 95))
    assert s["gpu"]["utilization_mean_pct"] is None and s["gpu"]["status"] == "no GPU"
    start = s["startup_s"]
    assert start["ray_ready"] == 0.5 and start["scoring_actor_ready"] == 5.0
    assert start["first_score_call_end"] == 8.0
    assert [p[0] for p in startup_phases(start)][-1] == "first scoring call"


def test_series_spreads_each_call_and_keeps_the_total():
    m = _metrics()
    series = m.series(T0 + 12)
    width = series["bucket_s"]
    assert sum(series["pairs_per_s"]) * width == pytest.approx(197, rel=1e-3)
    assert sum(series["tokens_per_s"]) * width == pytest.approx(1970, rel=1e-3)
    # Nothing is scored in the first six seconds.
    assert all(v == 0 for t, v in zip(series["t_s"], series["pairs_per_s"], strict=True) if t < 6)


def test_progress_counts_rows_through_scoring_and_rejects():
    p = _metrics().progress()
    assert (p["rows_scored_stage"], p["pairs"], p["rejects"]) == (200, 197, 3)


def _manifest(metrics):
    return {
        "run_id": "r1",
        "input": "in/",
        "output": "out/",
        "model": "m",
        "ray_version": "x",
        "rows_read": 203,
        "rows_scored": 197,
        "rows_truncated": 5,
        "rows_rejected": 6,
        "rows_filtered": 0,
        "rejects_by_reason": {"empty_text": 6},
        "filtered_by_reason": {},
        "pairs_per_s": 16.4,
        "wall_time_s": 12.0,
        "metrics": metrics,
    }


def test_render_writes_a_page_with_its_plots_inlined():
    m = _metrics()
    manifest = _manifest(m.summary(T0 + 12))
    before = json.dumps(manifest)
    files = render(manifest, m.detail(T0 + 12))
    assert json.dumps(manifest) == before  # the manifest is not changed
    page = files["report.html"].decode()
    for png in ("outcomes.png", "throughput.png", "busy.png", "latency.png", "startup.png"):
        assert files[png][:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("data:image/png;base64,") == 5
    assert "No GPU utilisation: no GPU." in page
    assert json.loads(files["metrics.json"])["summary"]["stages"]["score"]["pairs"] == 197


def test_progress_line_and_rate():
    assert format_line(50, 200, 10.0, 3, 75, bar=False) == (
        "rerank-ray progress: 50/200 rows (25%)  10 pairs/s  ETA 15s  rejects 3  1m15s elapsed"
    )
    assert format_line(300, 200, None, 0, 1, bar=True).startswith("[" + "#" * 24 + "] 200/200")
    states = iter([{"rows_scored_stage": 0, "rejects": 0}, {"rows_scored_stage": 40, "rejects": 1}])

    class Stream:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return True

    stream = Stream()
    progress = Progress(100, lambda: next(states), stream=stream)
    progress.update()
    progress.update()
    assert "40/100 rows (40%)" in progress.last_line and "rejects 1" in progress.last_line
    assert stream.text.count("\r") == 2


def test_timed_runner_times_every_micro_batch_sync_and_async():
    seen = []

    class Pending:
        def __init__(self, n):
            self.n = n

        def result(self):
            return np.zeros(self.n, np.float32)

    class AsyncRunner:
        padded = False

        def submit(self, ids, offsets, types=None):
            return Pending(len(offsets) - 1)

        def score(self, ids, offsets, types=None):
            return self.submit(ids, offsets, types).result()

    class SyncRunner:
        padded = True

        def score(self, ids, offsets, types=None):
            return np.zeros(len(offsets) - 1, np.float32)

    for inner in (AsyncRunner(), SyncRunner()):
        timed = TimedRunner(inner, lambda s, t: seen.append((s, t)))
        assert timed.padded is inner.padded
        assert (getattr(timed, "submit", None) is None) == isinstance(inner, SyncRunner)
        ids, offsets = np.arange(7), np.array([0, 3, 7])
        if hasattr(timed, "submit"):
            assert len(timed.submit(ids, offsets).result()) == 2
        assert len(timed.score(ids, offsets)) == 2
    assert [t for _, t in seen] == [7, 7, 7] and all(s >= 0 for s, _ in seen)


def test_stderr_filter_drops_only_the_notice_line(tmp_path):
    """A child process with the filter on writes the notice, an error and a bar redraw to
    fd 2 (as C++ would); only the notice is gone."""
    code = (
        "import os, sys; from rerank_ray import logs;"
        "logs.filter_stderr_line(logs.CORE_WORKER_NOTICE);"
        "os.write(2, b'[E core_worker.cc] Actor X ' + logs.CORE_WORKER_NOTICE + b' see #53727\\n');"
        "os.write(2, b'real error\\n'); os.write(2, b'\\rbar 1'); os.write(2, b'\\rbar 2\\n');"
        "print('warning via python', file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0
    err = done.stderr.decode()
    assert logs.CORE_WORKER_NOTICE.decode() not in err
    assert "real error\n" in err and "\rbar 1\rbar 2\n" in err and "warning via python" in err


def test_output_flags_pick_one_level():
    from rerank_ray.cli import build_parser, output_level

    parser = build_parser()
    assert output_level(parser.parse_args(["run"])) == "normal"
    assert output_level(parser.parse_args(["--quiet", "run"])) == "quiet"
    assert output_level(parser.parse_args(["--verbose", "run"])) == "verbose"
    with pytest.raises(SystemExit):
        parser.parse_args(["--quiet", "--verbose", "run"])


def test_readme_names_every_ray_metric():
    from pathlib import Path

    from rerank_ray.metrics import METRICS

    # The README's run-report section points to docs/run-report.md, which lists them.
    docs = (Path(__file__).resolve().parents[2] / "docs" / "run-report.md").read_text()
    for spec in METRICS:
        assert f"| `{spec.name}` | {spec.kind}" in docs, spec.name

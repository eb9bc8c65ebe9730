"""Per-call timings and counts of the tokenize, scoring and write stages, sent to the run report.

Every call of a stage (one block) makes one small record: stage, actor, start, end, rows, and
what the stage adds (rejects by reason from tokenize; tokens, micro-batch latencies, token
budget, OOM back-offs, peak GPU memory and NVML samples from scoring). The record goes to the
run's collector actor (``report.collect``) without waiting for it, and into the Ray metrics
(``metrics.py``). Each actor also sends one ``ready`` record when its set-up is done: its
process start (Ray worker start and imports come before ``start``) and the set-up itself
(model load, autotune) from ``start`` to ``end``. Nothing is per row.

With ``RERANK_RAY_TRACE_DIR`` set in the workers' environment, the same calls are also
appended as JSON lines to ``<dir>/<stage>-<pid>.jsonl`` on each node (``bench/run_bench.py``
reads them).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import pyarrow.compute as pc

from rerank_ray import schema

TRACE_ENV = "RERANK_RAY_TRACE_DIR"


def collector_name(run_id: str) -> str:
    """The name of a run's collector actor (``report.collect.start_collector``)."""
    return f"rerank-ray-metrics-{run_id}"


class CallTrace:
    """The trace of one actor's (or write task's) stage: ``tokenize``, ``score`` or ``write``."""

    def __init__(self, stage: str, run_id: str | None = None) -> None:
        """``run_id`` names the run's collector and tags the Ray metrics; without it (or
        outside Ray) only the trace directory is written, if set."""
        folder = os.environ.get(TRACE_ENV)
        self.path = os.path.join(folder, f"{stage}-{os.getpid()}.jsonl") if folder else None
        self.stage = stage
        self.actor = f"{socket.gethostname()}:{os.getpid()}"
        self.created = time.time()
        self._collector = None
        self._metrics = None
        self._scorer = None
        self._gpu = None
        self._batches: list[tuple[float, int]] = []  # (latency s, tokens) per micro-batch
        self._halvings_sent = 0
        self._lock = threading.Lock()
        if self.path:
            os.makedirs(folder, exist_ok=True)
        if run_id is not None:
            self._connect(run_id)

    def _connect(self, run_id: str) -> None:
        import ray

        if not ray.is_initialized():
            return
        from rerank_ray.metrics import RayMetrics

        self._metrics = RayMetrics(run_id)
        try:
            self._collector = ray.get_actor(collector_name(run_id))
        except ValueError:  # no collector: a Dataset built outside pipeline.run
            self._collector = None

    def attach_scorer(self, stage) -> None:
        """Observe a ``ScoreStage``: time its runner's micro-batches, read its token budget
        and sample its GPU."""
        from rerank_ray.gpu_monitor import GpuMonitor

        self._scorer = stage
        self._gpu = GpuMonitor(stage.device)
        stage.runner = TimedRunner(stage.runner, self._on_micro_batch)

    def _on_micro_batch(self, seconds: float, tokens: int) -> None:
        with self._lock:
            self._batches.append((seconds, tokens))
        if self._metrics is not None:
            self._metrics.observe("rerank_forward_latency_s", seconds)

    def ready(self, **details) -> None:
        """The actor's set-up is done (call at the end of ``__init__``); ``details`` (e.g.
        seconds per set-up step) go into its record."""
        try:
            import psutil

            process_start = psutil.Process().create_time()
        except ImportError:  # psutil comes with ray[default]; without it, no process start
            process_start = None
        record = {
            "stage": f"{self.stage}_init",
            "process_start": process_start,
            "start": self.created,
            "end": time.time(),
            "rows": 0,
            **details,
        }
        if self._scorer is not None:
            record["token_budget"] = self._scorer.budget.value
            record["gpu_name"] = self._gpu.name
            record["gpu_status"] = self._gpu.status
        self._send(record)

    def __call__(self, fn, batch):
        """``fn(batch)``, timed and counted."""
        start = time.time()
        out = fn(batch)
        self.record(start, time.time(), batch.num_rows, out)
        return out

    def record(self, start: float, end: float, rows: int, out=None) -> None:
        """One call from ``start`` to ``end`` over ``rows`` rows; ``out`` is its output block."""
        record: dict[str, Any] = {"start": start, "end": end, "rows": rows}
        if self.stage == "tokenize" and out is not None:
            record["rejects"] = _rejects(out)
            for reason, n in record["rejects"].items():
                self._inc("rerank_rows_rejected", n, reason=reason)
        if self._scorer is not None:
            record.update(self._scorer_state())
            record["pairs"] = out.num_rows - out[schema.SCORE].null_count if out is not None else 0
            self._inc("rerank_pairs_scored", record["pairs"])
            self._inc("rerank_tokens_scored", record["tokens"])
        self._send(record)

    def _scorer_state(self) -> dict[str, Any]:
        budget = self._scorer.budget
        with self._lock:  # a scoring actor may run calls in several threads
            batches, self._batches = self._batches, []
            new_halvings, self._halvings_sent = (
                budget.halvings - self._halvings_sent,
                budget.halvings,
            )
        self._inc("rerank_oom_backoffs", new_halvings)
        samples = self._gpu.drain()
        if samples and self._metrics is not None:
            self._metrics.set("rerank_gpu_utilization", samples[-1][1], actor=self.actor)
        return {
            "latencies_ms": [round(s * 1000, 3) for s, _ in batches],
            "tokens": sum(t for _, t in batches),
            "token_budget": budget.value,
            "oom_backoffs": budget.halvings,
            "peak_memory_mib": self._gpu.peak_memory_mib(),
            "gpu_samples": samples,
            "gpu_status": self._gpu.status,
        }

    def _inc(self, name: str, value: float, **tags: str) -> None:
        if self._metrics is not None:
            self._metrics.inc(name, value, **tags)

    def _send(self, record: dict[str, Any]) -> None:
        record = {"stage": self.stage, "actor": self.actor, "pid": os.getpid(), **record}
        if self._collector is not None:
            self._collector.add.remote(record)  # not awaited: the stage never waits for it
        if self.path:
            line = {k: v for k, v in record.items() if k not in ("gpu_samples", "latencies_ms")}
            with open(self.path, "a") as f:  # one short line per call; appends do not interleave
                f.write(json.dumps(line) + "\n")


def _rejects(block) -> dict[str, int]:
    """Rows of ``block`` (a tokenize output) rejected, by reason."""
    if schema.REJECT_REASON not in block.column_names:
        return {}
    counts = pc.value_counts(block[schema.REJECT_REASON].drop_null())
    return {c["values"].as_py(): c["counts"].as_py() for c in counts}


class TimedRunner:
    """A runner whose micro-batches are timed: ``on_batch(seconds, tokens)`` after each.

    A micro-batch's time runs from when it could start on the device (its submission, or
    the previous micro-batch's scores if those came later: the device runs one at a time)
    to its scores on the host. Everything else is the wrapped runner's.
    """

    def __init__(self, runner, on_batch) -> None:
        self._runner = runner
        self._on_batch = on_batch
        self._last_done = 0.0
        self._lock = threading.Lock()
        if hasattr(runner, "submit"):
            self.submit = self._submit

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def score(self, ids_flat, offsets, type_ids_flat=None):
        """The wrapped runner's ``score``, timed."""
        t = time.perf_counter()
        out = self._runner.score(ids_flat, offsets, type_ids_flat)
        self._done(t, len(ids_flat))
        return out

    def _submit(self, ids_flat, offsets, type_ids_flat=None):
        t = time.perf_counter()
        return _TimedPending(
            self._runner.submit(ids_flat, offsets, type_ids_flat), self, t, ids_flat
        )

    def _done(self, submitted: float, tokens: int) -> None:
        now = time.perf_counter()
        with self._lock:
            began = max(submitted, self._last_done)
            self._last_done = now
        self._on_batch(now - began, tokens)


class _TimedPending:
    def __init__(self, pending, runner: TimedRunner, submitted: float, ids_flat) -> None:
        self._pending, self._runner = pending, runner
        self._submitted, self._tokens = submitted, len(ids_flat)

    def result(self):
        out = self._pending.result()
        self._runner._done(self._submitted, self._tokens)
        return out

"""Per-call timings of the tokenize and scoring actors, written as JSON lines on each node.

With ``RERANK_RAY_TRACE_DIR`` set in the workers' environment, every call of a tokenize or
scoring actor appends one JSON line (stage, pid, start, end, rows) to
``<dir>/<stage>-<pid>.jsonl`` on its node, and each actor one ``<stage>_init`` line when its
set-up is done: its process start (Ray worker start and imports come before ``start``), and
the set-up itself (model resolve and load, autotune) from ``start`` to ``end``. Off (no file,
no cost) when unset. ``bench/run_bench.py`` turns the files into per-stage busy time.
"""

from __future__ import annotations

import json
import os
import time

TRACE_ENV = "RERANK_RAY_TRACE_DIR"


class CallTrace:
    """The trace of one actor's stage (``tokenize`` or ``score``)."""

    def __init__(self, stage: str) -> None:
        folder = os.environ.get(TRACE_ENV)
        self.path = os.path.join(folder, f"{stage}-{os.getpid()}.jsonl") if folder else None
        self.stage = stage
        self.created = time.time()
        if self.path:
            os.makedirs(folder, exist_ok=True)

    def _write(self, line: dict) -> None:
        with open(self.path, "a") as f:  # one short line per call; appends do not interleave
            f.write(json.dumps({"stage": self.stage, "pid": os.getpid(), **line}) + "\n")

    def ready(self, **details) -> None:
        """The actor's set-up is done (call at the end of ``__init__``); ``details`` (e.g.
        seconds per set-up step) go into its line."""
        if not self.path:
            return
        try:
            import psutil

            process_start = psutil.Process().create_time()
        except ImportError:  # psutil comes with ray[default]; without it, no process start
            process_start = None
        self._write(
            {
                "stage": f"{self.stage}_init",
                "process_start": process_start,
                "start": self.created,
                "end": time.time(),
                "rows": 0,
                **details,
            }
        )

    def __call__(self, fn, batch):
        if not self.path:
            return fn(batch)
        start = time.time()
        out = fn(batch)
        self._write({"start": start, "end": time.time(), "rows": batch.num_rows})
        return out

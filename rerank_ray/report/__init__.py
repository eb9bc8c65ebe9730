"""The run report: metrics gathered during the run, written at commit under ``_reports/<run_id>/``.

- ``collect.py``: the collector actor and the per-actor aggregates (``RunMetrics``);
- ``render.py``: the PNG plots and the self-contained ``report.html``.

``RunReport`` is the driver's side: it starts the collector, gives the manifest its
``metrics`` at commit, and writes the report files next to the committed run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rerank_ray import storage
from rerank_ray.report.collect import RunMetrics, start_collector

REPORTS_DIR = "_reports"
REPORT_NAME = "report.html"

log = logging.getLogger("rerank_ray")

__all__ = ["REPORTS_DIR", "REPORT_NAME", "RunMetrics", "RunReport", "report_path"]


def report_path(run_id: str) -> str:
    """The report page of ``run_id``, relative to the output root."""
    return f"{REPORTS_DIR}/{run_id}/{REPORT_NAME}"


class RunReport:
    """One run's report on the driver: its collector actor, then its files."""

    def __init__(self, run_id: str, started: float, marks: dict[str, float]) -> None:
        self.run_id = run_id
        self.collector = start_collector(run_id, started, marks)
        self.detail: dict[str, Any] | None = None
        self.notes: dict[str, Any] = {}

    def note(self, name: str, value: Any) -> None:
        """A fact the driver knows (e.g. how the tokenize pool was sized), put into the
        manifest's ``metrics`` under ``name`` as is."""
        self.notes[name] = value

    def mark(self, name: str) -> None:
        """A driver event now (e.g. ``dataset_started``), shown in the start-up breakdown."""
        self.collector.mark.remote(name, time.time())

    def progress(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """Rows, pairs and rejects so far (``RunMetrics.progress``); None when the collector
        does not answer within ``timeout`` (a busy driver or cluster: the line skips a draw)."""
        import ray

        try:
            return ray.get(self.collector.progress.remote(), timeout=timeout)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return None

    def manifest_part(self) -> dict[str, Any]:
        """The manifest's ``metrics`` (and where the report will be), taken at commit."""
        import ray

        try:
            summary, self.detail = ray.get(self.collector.finish.remote(time.time()))
        except ray.exceptions.RayActorError as err:  # the report is lost, never the run
            log.warning("run %s: no run report (its metrics collector died: %s)", self.run_id, err)
            return {"metrics": None}
        return {"metrics": summary | self.notes, "report": report_path(self.run_id)}

    def write(self, out, manifest: dict[str, Any]) -> str | None:
        """Write the report of the committed ``manifest`` under ``out``; returns its path
        (None when the collector was lost and there is nothing to draw)."""
        from rerank_ray.report.render import render
        from rerank_ray.sink.location import write_bytes

        if self.detail is None:
            return None
        folder = out.path(REPORTS_DIR, self.run_id)
        for name, body in render(manifest, self.detail).items():
            write_bytes(out.fs, storage.join(folder, name), body)
        path = out.display(storage.join(folder, REPORT_NAME))
        log.info("run report: %s", path)
        return path

    def close(self) -> None:
        """End the collector actor."""
        import ray

        ray.kill(self.collector)

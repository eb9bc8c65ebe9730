"""Live progress on the driver: rows done of rows read, pairs/s, ETA and rejects, on one line.

On a terminal the line is redrawn in place as a bar; otherwise (a log file, ``ray job
logs``) a plain line is printed every ``LOG_EVERY_S`` seconds. The numbers come from the
run's collector (``report.RunReport.progress``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

POLL_S = 1.0
LOG_EVERY_S = 30.0
RATE_WINDOW_S = 20.0  # pairs/s and the ETA use the last this many seconds
BAR_WIDTH = 24


def format_line(
    done: int, total: int, rate: float | None, rejects: int, elapsed: float, bar: bool
) -> str:
    """One progress line; ``rate`` is rows/s through scoring (None before the first)."""
    done = min(done, total)
    share = done / total if total else 1.0
    eta = _duration((total - done) / rate) if rate else "?"
    text = (
        f"{done:,}/{total:,} rows ({share:.0%})  "
        f"{f'{rate:,.0f}' if rate else '-'} pairs/s  ETA {eta}  rejects {rejects:,}  "
        f"{_duration(elapsed)} elapsed"
    )
    if not bar:
        return f"rerank-ray progress: {text}"
    filled = int(round(share * BAR_WIDTH))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {text}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """A thread that polls ``poll()`` (``RunMetrics.progress``) and draws the line."""

    def __init__(
        self,
        total_rows: int,
        poll: Callable[[], dict[str, Any] | None],
        stream: TextIO | None = None,
        interactive: bool | None = None,
    ) -> None:
        """``interactive``: redraw a bar in place; default: whether ``stream`` is a TTY."""
        self.total = total_rows
        self.poll = poll
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if interactive is None else interactive
        self.started = time.time()
        self._history: deque[tuple[float, int]] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rerank-progress", daemon=True)
        self._last_log = 0.0
        self.last_line: str | None = None

    def start(self) -> Progress:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Draw the final state (printed also off a terminal) and end the line."""
        self._stop.set()
        self._thread.join(timeout=POLL_S * 5)
        self._last_log = 0.0
        self.update()
        if self.bar and self.last_line is not None:
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.update()

    def update(self) -> None:
        """Poll once and draw (in place on a TTY, else at most every ``LOG_EVERY_S``)."""
        state = self.poll()
        if state is None:  # the collector did not answer in time: skip this draw
            return
        now = time.time()
        done = state["rows_scored_stage"]
        self._history.append((now, done))
        while len(self._history) > 2 and now - self._history[0][0] > RATE_WINDOW_S:
            self._history.popleft()
        t0, d0 = self._history[0]
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        line = format_line(done, self.total, rate, state["rejects"], now - self.started, self.bar)
        self.last_line = line
        if self.bar:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif now - self._last_log >= LOG_EVERY_S and done:
            self._last_log = now
            self.stream.write(line + "\n")
            self.stream.flush()

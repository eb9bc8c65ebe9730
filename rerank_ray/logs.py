"""What a run prints on the driver: its verbosity, and the Ray lines a healthy run leaves out.

Three levels: ``quiet`` (warnings, errors and the summary line), ``normal`` (the job's own
INFO lines and the live progress line) and ``verbose`` (everything Ray prints, its progress
bars included, and full tracebacks). Ray lines that read like failures but are not are left
out at the logger that emits them (``RAY_NOTICES``); each entry says why. Nothing else is
filtered: a warning about the user's data, config or cluster still shows.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

LEVELS = ("quiet", "normal", "verbose")


@dataclass
class Output:
    """The driver's output settings (set once by the CLI; library calls get ``normal``)."""

    level: str = "normal"
    # Whether stderr was a terminal before ``filter_stderr_line`` made it a pipe.
    stderr_tty: bool | None = None

    @property
    def progress_line(self) -> bool:
        """Draw the job's own progress line."""
        return self.level == "normal"

    @property
    def ray_progress(self) -> bool:
        """Keep Ray Data's progress bars and INFO lines on the console."""
        return self.level == "verbose"


OUTPUT = Output()


@dataclass(frozen=True)
class Notice:
    """A Ray log line a healthy run prints that is not about the user's data or config."""

    logger: str
    starts: str
    why: str


RAY_NOTICES = (
    Notice(
        "ray._private.authentication.authentication_token_setup",
        "Token authentication is enabled for this Ray cluster",
        "A new local Ray instance turns on token authentication, its secure default; the "
        "job keeps it. The warning only announces the default.",
    ),
    Notice(
        "ray.data._internal.progress",
        "Progress bars disabled",
        "The job turns Ray Data's progress bars off on purpose (it draws its own line); "
        "--verbose keeps them.",
    ),
)

# Ray's core worker (C++, in the driver) prints this at ERROR level when an actor is created
# with max_restarts != 0 and any constructor argument by reference
# (core_worker.cc, CreateActor; ray-project/ray#53727). Ray Data 2.60 creates every map actor
# so: max_restarts=-1 for fault tolerance, and its own MapTransformer and DataContext put in
# the object store (ActorPoolMapOperator._start_actor: ``map_transformer=
# self._map_transformer_ref``). The operator holds those refs for the whole run, so a
# restart finds them; the only way to avoid the line, max_restarts=0, would give up
# restarting a crashed scoring actor. Being C++ it bypasses Python logging, hence a filter
# on the stderr stream, for this line only.
CORE_WORKER_NOTICE = b"has constructor arguments in the object store and max_restarts > 0"


class _DropNotices(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def configure(level: str = "normal") -> None:
    """Set the driver's output for a CLI run: log format and level, Ray's notices left out
    (unless ``verbose``), and the core worker's actor-restart line filtered from stderr."""
    if level not in LEVELS:
        raise ValueError(f"output level {level!r} is not one of {LEVELS}")
    OUTPUT.level = level
    OUTPUT.stderr_tty = sys.stderr.isatty()
    logging.basicConfig(
        level=logging.WARNING if level == "quiet" else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("rerank_ray").setLevel(logging.WARNING if level == "quiet" else logging.INFO)
    if level != "verbose":
        filter_stderr_line(CORE_WORKER_NOTICE)


def quiet_ray_logs() -> None:
    """Leave Ray's notices (``RAY_NOTICES``) out and keep Ray Data's INFO lines in its log
    file only; call on the driver before Ray starts. Nothing changes at ``verbose``."""
    if OUTPUT.ray_progress:
        return
    by_logger: dict[str, tuple[str, ...]] = {}
    for notice in RAY_NOTICES:
        by_logger[notice.logger] = (*by_logger.get(notice.logger, ()), notice.starts)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(starts))
    import ray.data  # noqa: F401 - configures the "ray.data" logger's handlers

    # Ray Data logs each execution's plan and progress at INFO to the console and to
    # <session>/logs/ray-data/; only the console copy is raised to WARNING.
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


_filter_process: subprocess.Popen | None = None


def filter_stderr_line(fragment: bytes) -> None:
    """Route this process's stderr (file descriptor 2, so C++ writes too) through a child
    process that drops lines containing ``fragment`` and passes the rest on unchanged.

    A child process, not a thread: if the driver dies, the child still drains what it was
    sent (a crash's last lines included) and exits at end of input.
    """
    global _filter_process
    if _filter_process is not None:
        return
    sys.stderr.flush()
    original = os.dup(2)
    _filter_process = subprocess.Popen(
        [sys.executable, "-c", _FILTER_SOURCE, fragment.hex()],
        stdin=subprocess.PIPE,
        stdout=original,
        stderr=original,
        close_fds=True,
    )
    os.dup2(_filter_process.stdin.fileno(), 2)
    _filter_process.stdin.close()  # fd 2 now holds the pipe's write end
    atexit.register(_restore_stderr, original)


def _restore_stderr(original: int) -> None:
    """At exit: give fd 2 back, so the filter sees the end of its input, and let it finish
    writing before the shell prompt returns."""
    sys.stderr.flush()
    os.dup2(original, 2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        # Processes this one started may hold the pipe too; do not wait on them.
        _filter_process.wait(timeout=2)


# Whole lines are checked; an unfinished line (a progress bar redrawn with \r, a prompt) is
# passed on once the writer pauses, so it is never held back for long.
_FILTER_SOURCE = """
import os, select, sys
drop = bytes.fromhex(sys.argv[1])
buf = b""
while True:
    ready, _, _ = select.select([0], [], [], 0.2)
    if ready:
        chunk = os.read(0, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\\n")
        out = b"".join(line + b"\\n" for line in lines if drop not in line)
    else:
        out, buf = (buf, b"") if drop not in buf else (b"", buf)
    if out:
        os.write(1, out)
if buf and drop not in buf:
    os.write(1, buf)
"""

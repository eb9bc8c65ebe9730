"""The commit: check every row came out once, move staged files into place, write the manifest.

The manifest (``_manifests/<run_id>.json``, then ``_SUCCESS``) is the commit point and lists
the run's files. Only after it is written are the files of an earlier commit of the same run
id deleted, so a rerun replaces its output and never duplicates it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rerank_ray.errors import RerankError
from rerank_ray.sink.location import OutputLocation, delete_dir, make_dirs, read_json, write_bytes
from rerank_ray.sink.records import Entry, Totals


class RowCountError(RerankError, RuntimeError):
    """Rows out differ from rows in; the run is not committed."""


def commit(
    out: OutputLocation,
    entries: list[Entry],
    *,
    new_entries: list[Entry],
    expected_rows: int,
    run_date: str,
    started: float,
    resumed_rows: int,
    extra: dict[str, Any],
    late_extra: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Commit ``entries`` (kept + new) and return the manifest; ``RowCountError`` (and
    nothing committed) when the rows out differ from ``expected_rows``."""
    fs = out.fs
    totals = Totals.of(entries)
    if totals.rows != expected_rows:
        delete_dir(fs, out.staging)
        raise RowCountError(
            f"Run {out.run_id}: {expected_rows} rows were read but {totals.rows} came "
            f"out ({totals.scored} scored + {totals.rejected} rejected + {totals.filtered} "
            f"filtered). Nothing was committed to {out.uri}; rerun the job."
        )
    late = late_extra() if late_extra else {}
    previous = read_json(fs, out.manifest)
    committed = _move_all(out, totals.files)
    wall = time.time() - started
    rel = sorted(out.relative(p) for p in committed)
    manifest = {
        "run_id": out.run_id,
        "run_date": run_date,
        "status": "committed",
        "rows_read": expected_rows,
        "rows_scored": totals.scored,
        "rows_rejected": totals.rejected,
        "rows_truncated": totals.truncated,
        "rejects_by_reason": dict(sorted(totals.reasons.items())),
        "rows_filtered": totals.filtered,
        "filtered_by_reason": dict(sorted(totals.filtered_reasons.items())),
        "rows_resumed": resumed_rows,
        "rows_processed_this_attempt": sum(e.rows for e in new_entries),
        "wall_time_s": round(wall, 3),
        "pairs_per_s": round(sum(e.scored for e in new_entries) / wall, 2) if wall > 0 else None,
        "replaced_previous_commit": bool(previous),
        "files": rel,
        **extra,
        **late,
    }
    body = json.dumps(manifest, indent=2).encode()
    write_bytes(fs, out.manifest, body)
    write_bytes(fs, out.success, body)
    # After the commit point: remove what an earlier commit of this run id wrote.
    for path in set((previous or {}).get("files", [])) - set(rel):
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(out.path(path))
    delete_dir(fs, out.staging)
    return manifest


def _move_all(out: OutputLocation, files: list[str]) -> list[str]:
    """Move staged files to the same relative place under the output root."""
    fs, staging = out.fs, out.staging
    targets = [out.path(f[len(staging) + 1 :]) for f in files]

    def move(pair: tuple[str, str]) -> None:
        src, dst = pair
        make_dirs(fs, dst.rsplit("/", 1)[0])
        fs.move(src, dst)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(move, zip(files, targets, strict=True)))
    return targets

"""The commit: check every row came out once, move staged files into place, write the manifest.

The manifest (``_manifests/<run_id>.json``, then ``_SUCCESS``) is the commit point and lists
the run's files. The moves before it are journaled (``journal.py``): a failed move or manifest
write moves everything back, so a failed commit leaves nothing outside ``_staging/``. Only
after the manifest is written are the files of an earlier commit of the same run id deleted,
so a rerun replaces its output and never duplicates it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from rerank_ray import storage
from rerank_ray.errors import RerankError
from rerank_ray.sink.journal import (
    STORE_ERRORS,
    CommitError,
    Journal,
    fail_and_undo,
    finish,
    move_into_place,
    write_journal,
)
from rerank_ray.sink.location import OutputLocation, read_json, write_bytes
from rerank_ray.sink.records import Entry, Totals

log = logging.getLogger("rerank_ray")


class RowCountError(RerankError, RuntimeError):
    """Rows out differ from rows in; the run is not committed."""


def commit(
    out: OutputLocation,
    entries: list[Entry],
    *,
    lock: str,
    new_entries: list[Entry],
    expected_rows: int,
    run_date: str,
    started: float,
    resumed_rows: int,
    extra: dict[str, Any],
    late_extra: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Commit ``entries`` (kept + new) and return the manifest; ``RowCountError`` (and
    nothing committed) when the rows out differ from ``expected_rows``, ``CommitError``
    (nothing committed, or what the next run repairs) when the store fails. ``lock`` is the
    lock the run holds (its path), recorded in the journal."""
    fs = out.fs
    totals = Totals.of(entries)
    if totals.rows != expected_rows:
        out.delete_tree(out.staging)
        raise RowCountError(
            f"Run {out.run_id}: {expected_rows} rows were read but {totals.rows} came "
            f"out ({totals.scored} scored + {totals.rejected} rejected + {totals.filtered} "
            f"filtered). Nothing was committed to {out.uri}; rerun the job."
        )
    late = late_extra() if late_extra else {}
    previous = read_json(fs, out.manifest)
    staging = out.staging
    # The same relative place under the output root as under the staging directory.
    moves = [(out.relative(f), f[len(staging) + 1 :]) for f in totals.files]
    rel = sorted(final for _, final in moves)
    journal = Journal(
        run_id=out.run_id,
        lock=out.relative(lock),
        moves=moves,
        stale=sorted(set((previous or {}).get("files", [])) - set(rel)),
    )
    write_journal(out, journal)
    move_into_place(out, journal)
    wall = time.time() - started
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
    try:
        write_bytes(fs, out.manifest, body)
    except STORE_ERRORS as err:
        fail_and_undo(out, journal, moves, err, "writing its manifest")
    try:
        write_bytes(fs, out.success, body)
    except STORE_ERRORS as err:
        raise CommitError(
            f"Run {out.run_id} is committed ({out.display(out.manifest)} lists its files), but "
            f"{out.display(out.success)} could not be written: {storage.describe_error(err)}. "
            f"Rerun with --run-id {out.run_id} to write it (the rerun replaces this commit)."
        ) from err
    try:
        finish(out, journal)
    except STORE_ERRORS as err:
        log.warning(
            "run %s is committed, but cleaning up after it failed (%s); the next run on this "
            "output finishes it",
            out.run_id,
            storage.describe_error(err),
        )
    return manifest

"""The commit journal: the moves a commit makes, undone when it fails, repaired by the next run.

Before it moves anything, a commit writes ``_staging/<run_id>/_commit.json`` listing every
(staged path, final path) move, the lock it holds, and the files of the run id's earlier
commit that it replaces. If a move fails, the run moves back what it moved and fails with
nothing committed. If moving back fails too (the store is still down), the journal stays, and
the next run on the output (``repair``, called right after it takes its lock) moves those files
back, or, when the run's manifest lists exactly the journal's files (the run committed and only
its cleanup failed), finishes the cleanup. The journal is deleted last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from rerank_ray import storage
from rerank_ray.errors import RerankError
from rerank_ray.sink.location import (
    MANIFESTS_DIR,
    STAGING_DIR,
    OutputLocation,
    read_json,
    write_bytes,
)
from rerank_ray.sink.locks import lock_is_live

log = logging.getLogger("rerank_ray")

JOURNAL_NAME = "_commit.json"
STORE_ERRORS = (OSError, pa.ArrowException)


class CommitError(RerankError, RuntimeError):
    """Staged files could not be moved into place (or back); the message says what is left."""


@dataclass
class Journal:
    """One commit's moves; every path relative to the output root."""

    run_id: str
    lock: str
    moves: list[tuple[str, str]]
    stale: list[str]

    @property
    def files(self) -> list[str]:
        """The final paths: what the run's manifest lists once it has committed."""
        return sorted(final for _, final in self.moves)


def journal_path(out: OutputLocation, run_id: str) -> str:
    return out.path(STAGING_DIR, run_id, JOURNAL_NAME)


def write_journal(out: OutputLocation, journal: Journal) -> None:
    """Write the journal before any move; ``CommitError`` when the store refuses."""
    try:
        write_bytes(out.fs, journal_path(out, journal.run_id), json.dumps(asdict(journal)).encode())
    except STORE_ERRORS as err:
        raise CommitError(
            f"Run {out.run_id} was not committed: its commit journal could not be written to "
            f"{out.uri} ({storage.describe_error(err)}). Nothing was moved; rerun with --run-id "
            f"{out.run_id} when the store answers (its staged work is kept)."
        ) from err


def move_into_place(out: OutputLocation, journal: Journal) -> None:
    """Make the journal's moves; if one fails, move back what was moved and raise
    ``CommitError`` saying nothing was committed (or what the next run will repair)."""
    failed = threading.Event()
    started: list[tuple[str, str]] = []
    guard = threading.Lock()

    def move(pair: tuple[str, str]) -> None:
        if failed.is_set():
            return  # the store failed: stop moving, start undoing
        with guard:
            started.append(pair)
        try:
            out.move(out.path(pair[0]), out.path(pair[1]))
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(move, pair) for pair in journal.moves]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        fail_and_undo(out, journal, started, errors[0], "moving its staged files into place")


def fail_and_undo(
    out: OutputLocation,
    journal: Journal,
    moved: list[tuple[str, str]],
    err: BaseException,
    doing: str,
) -> None:
    """Move ``moved`` back, then raise ``CommitError`` for ``err`` (raised while ``doing``)."""
    left = undo(out, moved)
    what = f"Run {out.run_id} was not committed: {doing} failed ({storage.describe_error(err)})"
    if not left:
        # If this fails too, the next run finds nothing to move back and deletes it.
        with contextlib.suppress(*STORE_ERRORS):
            out.delete_file(journal_path(out, journal.run_id))
        raise CommitError(
            f"{what}. The {len(moved)} file(s) already moved were moved back: nothing was "
            f"committed to {out.uri}. Rerun with --run-id {out.run_id}: its staged work is kept."
        ) from err
    raise CommitError(
        f"{what}, and {len(left)} of the {len(moved)} file(s) moved could not be moved back "
        f"(e.g. {out.display(out.path(left[0][1]))}). The journal "
        f"{out.display(journal_path(out, journal.run_id))} lists them: the next run on "
        f"{out.uri} (any run id) moves them back before it starts. Then rerun with --run-id "
        f"{out.run_id}."
    ) from err


def undo(out: OutputLocation, moves: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Move every final file of ``moves`` that exists back to its staged path; return the
    moves that could not be undone."""
    left = []
    for staged, final in moves:
        src, dst = out.path(final), out.path(staged)
        try:
            if not out.exists(src):
                continue
            if out.exists(dst):  # a move that copied but did not delete: drop the copy
                out.delete_file(src)
            else:
                out.move(src, dst)
            out.prune(src.rsplit("/", 1)[0])
        except STORE_ERRORS:
            left.append((staged, final))
    return left


def finish(out: OutputLocation, journal: Journal) -> None:
    """After the commit point: delete the earlier commit's replaced files, then the run's
    staging directory, its progress markers first (so nothing half-deleted looks resumable)
    and the journal last."""
    out.delete_files([out.path(p) for p in journal.stale])
    staging = out.path(STAGING_DIR, journal.run_id)
    out.delete_tree(storage.join(staging, "_progress"))
    out.delete_tree(staging, last=journal_path(out, journal.run_id))


def repair(out: OutputLocation) -> list[str]:
    """Undo, or finish, the commits that failed on this output; return their run ids.

    Call right after taking the run's lock, before anything else reads or writes the output.
    The journals of runs alive now (another partition's run in the middle of its commit) are
    left alone. ``CommitError`` when the store still fails.
    """
    staging_root = out.path(STAGING_DIR)
    try:
        runs = out.fs.get_file_info(
            pafs.FileSelector(staging_root, recursive=False, allow_not_found=True)
        )
    except STORE_ERRORS:
        return []  # an unreadable output fails the run's own first write, with its message
    repaired = []
    for info in runs:
        if info.type != pafs.FileType.Directory:
            continue
        body = read_json(out.fs, storage.join(info.path, JOURNAL_NAME))
        if body is None:
            continue
        journal = Journal(
            run_id=body["run_id"],
            lock=body["lock"],
            moves=[tuple(m) for m in body["moves"]],
            stale=list(body["stale"]),
        )
        if journal.run_id != out.run_id and lock_is_live(
            out, out.path(journal.lock), journal.run_id
        ):
            continue
        manifest = read_json(out.fs, out.path(MANIFESTS_DIR, f"{journal.run_id}.json")) or {}
        try:
            if sorted(manifest.get("files", [])) == journal.files:
                finish(out, journal)
                log.warning("finished the cleanup of run %s's commit", journal.run_id)
            else:
                if left := undo(out, journal.moves):
                    raise OSError(f"{len(left)} file(s) could not be moved back")
                out.delete_file(journal_path(out, journal.run_id))
                log.warning(
                    "moved back the files of run %s's failed commit (%d moves in its journal); "
                    "rerun it with --run-id %s",
                    journal.run_id,
                    len(journal.moves),
                    journal.run_id,
                )
        except STORE_ERRORS as err:
            raise CommitError(
                f"Run {journal.run_id} left a failed commit on {out.uri} (journal "
                f"{out.display(journal_path(out, journal.run_id))}), and repairing it failed: "
                f"{storage.describe_error(err)}. Rerun when the store answers."
            ) from err
        repaired.append(journal.run_id)
    return repaired

"""Resume: keep what a killed attempt of the same run id staged for its finished shards.

A shard counts as done when its progress markers' rows add up to exactly its row count (from
the Parquet footer). Anything else staged (files of unfinished shards, files of a task that
died before its marker) is deleted, and those shards are read and scored again.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

from rerank_ray import storage
from rerank_ray.sink.location import OutputLocation, list_files, write_bytes
from rerank_ray.sink.records import Entry


@dataclass
class ResumeState:
    """Staged work of an earlier attempt of this run id that can be kept."""

    entries: list[Entry] = field(default_factory=list)
    done_sources: set[str] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


def resume_state(out: OutputLocation, rows_per_source: dict[str, int]) -> ResumeState:
    """Keep the staged files of shards whose rows are all accounted for; delete the rest."""
    fs = out.fs
    entries: list[Entry] = []
    # Only whole markers: a write task killed mid-write leaves at most a temporary file.
    for info in [p for p in list_files(fs, out.progress) if p.endswith(".json")]:
        with fs.open_input_stream(info) as fh:
            entries.extend(Entry(**e) for e in json.loads(fh.read()))
    seen: Counter = Counter()
    for e in entries:
        seen[e.source] += e.rows
    done = {
        src for src, rows in seen.items() if src in rows_per_source and rows == rows_per_source[src]
    }
    kept = [e for e in entries if e.source in done]
    keep_files = {f for e in kept for f in e.files}
    out.delete_files([p for p in list_files(fs, out.staging) if p not in keep_files])
    if kept:
        write_bytes(
            fs,
            storage.join(out.progress, "resumed.json"),
            json.dumps([asdict(e) for e in kept]).encode(),
        )
    return ResumeState(entries=kept, done_sources=done)


def discard_staging(out: OutputLocation) -> None:
    """Delete everything an earlier attempt of this run id staged."""
    out.delete_tree(out.staging)

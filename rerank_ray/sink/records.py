"""What write tasks report: one ``Entry`` per (write task flush, input shard), and their sums."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Entry:
    """Rows of one input shard (``source``) written by one write task, and where."""

    source: str | None
    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    filtered: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    filtered_reasons: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.scored + self.rejected + self.filtered


@dataclass
class Totals:
    """Sums over entries, for the row-count check and the manifest."""

    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    filtered: int = 0
    reasons: Counter = field(default_factory=Counter)
    filtered_reasons: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Totals:
        t = cls()
        for e in entries:
            t.scored += e.scored
            t.rejected += e.rejected
            t.truncated += e.truncated
            t.filtered += e.filtered
            t.reasons.update(e.reasons)
            t.filtered_reasons.update(e.filtered_reasons)
            t.files.extend(e.files)
        return t

    @property
    def rows(self) -> int:
        return self.scored + self.rejected + self.filtered

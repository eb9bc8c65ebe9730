"""A small JSON file of keyed entries under the cache root: read leniently, written atomically.

The token-budget autotune (``autotune.py``) and the stages' measured rates (``rates.py``) each
keep one such file. A missing, unreadable or corrupt file reads as empty: a cache never decides
whether a run works, only how fast it starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def read_entries(path: Path) -> dict[str, Any]:
    """Every entry of the file at ``path``; empty when it is missing, unreadable or not a
    JSON object."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def read_entry(path: Path, key: str) -> Any:
    """The entry stored under ``key``, or None."""
    return read_entries(path).get(key)


def write_entry(path: Path, key: str, value: Any) -> None:
    """Store ``value`` (JSON-serialisable) under ``key``, keeping the other entries; written to
    a temporary file in the same folder, then renamed over the file, so that a reader never
    sees half a file. Raises ``OSError`` when the folder cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = read_entries(path)
    entries[key] = value
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

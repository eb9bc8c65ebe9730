"""Output: where a run writes, how its rows are written, resumed, locked and committed.

- ``location.py``: ``OutputLocation``, the output root resolved once, and its sub-paths;
- ``writer.py``: ``RerankSink``, the Ray Data sink (staged, with progress markers);
- ``resume.py``: what a killed attempt of the same run id staged and can keep;
- ``locks.py``: one run per output partition at a time (a lock with a heartbeat);
- ``commit.py``: the row-count check, the move into place and the manifest;
- ``journal.py``: the commit's moves, undone when it fails, repaired by the next run.
"""

from rerank_ray.sink.commit import RowCountError
from rerank_ray.sink.journal import CommitError, repair
from rerank_ray.sink.location import OutputLocation
from rerank_ray.sink.locks import ConcurrentRunError, acquire_lock, release_lock
from rerank_ray.sink.resume import ResumeState, discard_staging, resume_state
from rerank_ray.sink.writer import SOURCE_COLUMN, RerankSink

__all__ = [
    "SOURCE_COLUMN",
    "CommitError",
    "ConcurrentRunError",
    "OutputLocation",
    "RerankSink",
    "ResumeState",
    "RowCountError",
    "acquire_lock",
    "discard_staging",
    "release_lock",
    "repair",
    "resume_state",
]

"""The errors rerank-ray raises on purpose, and how one is found inside Ray's wrappers.

Every error the project raises for a user or environment problem derives from
``RerankError``; its message names the value, where it came from, and the fix. The CLI prints
it as one line and exits 2 (``cli.run_main``).
"""

from __future__ import annotations


class RerankError(Exception):
    """A user or environment error with a message meant to be read as is."""


def find_rerank_error(err: BaseException) -> RerankError | None:
    """The ``RerankError`` behind ``err``: itself, its cause chain, or the cause Ray keeps
    when an actor or task raised it (``RayTaskError.cause``); None when there is none."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RerankError):
            return e
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None

"""rerank-ray: distributed batch reranking of (query, document) pairs on Ray Data.

Public surface: ``JobConfig`` (the typed job configuration) and ``run(config)``. ``run`` is
imported on first use, so the scoring modules (``rerank_ray.runners``) import without Ray.
"""

from rerank_ray.config import ConfigError, JobConfig

__all__ = ["ConfigError", "JobConfig", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "run":
        from rerank_ray.pipeline import run

        return run
    raise AttributeError(f"module 'rerank_ray' has no attribute {name!r}")

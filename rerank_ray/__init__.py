"""rerank-ray: distributed batch reranking of (query, document) pairs on Ray Data.

Public surface: ``JobConfig`` (the typed job configuration) and ``run(config)``.
"""

from rerank_ray.config import ConfigError, JobConfig
from rerank_ray.pipeline import run

__all__ = ["ConfigError", "JobConfig", "run"]
__version__ = "0.1.0"

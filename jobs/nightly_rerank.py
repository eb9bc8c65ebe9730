"""Entrypoint for ``ray job submit``: nightly rerank, keeping each query's best K.

    ray job submit --working-dir . -- python jobs/nightly_rerank.py \
        --input s3://bucket/candidates/ --output s3://bucket/nightly/ --top-k 20
"""

import sys
from pathlib import Path

# Runs from the submitted working directory without installing the package there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerank_ray.modes.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("nightly", sys.argv[1:]))

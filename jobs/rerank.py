"""Entrypoint for ``ray job submit``: the same flags as ``rerank-ray run``.

    ray job submit --working-dir . -- python jobs/rerank.py \
        --input s3://bucket/pairs/ --output s3://bucket/scores/
"""

import sys
from pathlib import Path

# Runs from the submitted working directory without installing the package there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerank_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

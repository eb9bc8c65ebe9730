"""Entrypoint for ``ray job submit``: label scored pairs and export training data.

    ray job submit --working-dir . -- python jobs/label_training_data.py \
        --input s3://bucket/candidates/ --output s3://bucket/labels/ \
        --pos-threshold 0.8 --neg-threshold 0.2 --hard-negative-min-rank 10
"""

import sys
from pathlib import Path

# Runs from the submitted working directory without installing the package there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerank_ray.modes.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("labeling", sys.argv[1:]))

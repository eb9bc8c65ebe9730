"""Every entrypoint's ``--help`` works and shows defaults, with no measured figures in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

ENTRYPOINTS = [
    [sys.executable, "-m", "rerank_ray.cli", "run", "--help"],
    [sys.executable, "-m", "rerank_ray.cli", "nightly", "--help"],
    [sys.executable, "-m", "rerank_ray.cli", "labeling", "--help"],
    [sys.executable, str(REPO / "jobs" / "rerank.py"), "--help"],
    [sys.executable, str(REPO / "jobs" / "nightly_rerank.py"), "--help"],
    [sys.executable, str(REPO / "jobs" / "label_training_data.py"), "--help"],
]


@pytest.mark.parametrize("argv", ENTRYPOINTS, ids=lambda a: " ".join(Path(x).name for x in a[1:]))
def test_help_works_and_shows_defaults(argv):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "--max-length" in text and "--input" in text
    assert "(default: 512)" in text  # max_length's default is shown
    assert "Traceback" not in done.stderr
    # Figures belong in bench/, not in help text: no "~6% faster", no pairs/s, no GPU names.
    assert not re.search(r"\d+\s*%|pairs/s|H200", text), text


def test_mode_help_lists_the_mode_flags():
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "nightly_rerank.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "--top-k" in done.stdout and "--mode-config" in done.stdout

#!/usr/bin/env bash
# The project's test command: creates .venv, installs everything, runs ruff and pytest.
# Works from a fresh clone on a machine with Python 3.10+ and network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: otherwise a dependency's plain "torch" requirement pulls a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# FlagEmbedding is the scoring reference in the tests. Its declared dependencies are for
# training (ir-datasets, sentencepiece, ...); its reranker needs only what [test] installs.
python -m pip install -q --no-deps flagembedding==1.4.2
ruff check .
ruff format --check .
python -m pytest "$@"

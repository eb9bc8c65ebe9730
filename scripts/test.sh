#!/usr/bin/env bash
# The project's test command: creates .venv, installs the tested versions (constraints.txt),
# runs ruff and pytest. Works from a fresh clone on a machine with Python 3.10+ (3.11 tested)
# and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned, so no dependency resolves torch on its own. On Linux, PyPI's torch
# wheel is the CUDA build; for a CPU-only one use PyTorch's CPU index (README: Install).
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e '.[test]'
# FlagEmbedding is the scoring reference in the tests (never skipped). Its declared
# dependencies are for training; its reranker needs only what [test] installs.
python -m pip install -q -c constraints.txt --no-deps flagembedding==1.4.2
# Chromium (Debian's package) opens the run report in the browser test.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "scripts/test.sh: could not install chromium; the report's browser test will skip" >&2
fi
ruff check .
ruff format --check .
python -m pytest "$@"

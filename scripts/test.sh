#!/usr/bin/env bash
# Install jvlm with its test dependencies (CPU PyTorch 2.13.0), then run ruff and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]"
python3 -m ruff check .
python3 -m pytest -q "$@"

#!/usr/bin/env bash
# Set up from scratch, lint (ruff, mypy) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
.venv/bin/python -m pytest -q "$@"

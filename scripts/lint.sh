#!/usr/bin/env bash
# ruff (lint and format) and mypy on the packages (settings in pyproject.toml); any finding fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(xquant xquant_core xquant_plugins)
.venv/bin/ruff check "${PACKAGES[@]}"
.venv/bin/ruff format --check "${PACKAGES[@]}"
.venv/bin/mypy

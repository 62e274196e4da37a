#!/usr/bin/env bash
# Set up xquant from scratch in ./.venv (idempotent): packages, the sample's real
# material (MobileNetV2 weights, calibration and evaluation photos) and its ONNX export.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch is pinned to the CPU build here: an open range can pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import xquant, torch, onnxruntime" # fail here, not later, if the install broke
.venv/bin/python samples/fetch_material.py
.venv/bin/python samples/mobilenet_v2/export.py

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
# ml_dtypes (onnx's dependency) below 0.7: 0.7.0's extension takes 0.48 s to import against
# 0.004 s for 0.6.0 and 0.5.4 (measured here, numpy 2.4), paid by every run: O-net 4.3 -> 3.5 s.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "ml_dtypes<0.7" -e ".[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import xquant, torch, onnxruntime" # fail here, not later, if the install broke
.venv/bin/python samples/fetch_material.py
.venv/bin/python samples/mobilenet_v2/export.py

#!/usr/bin/env bash
# Set up, quantize the bundled MobileNetV2 sample and compare INT8 with FP32 on the
# held-out labelled photos.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/xquant -c samples/mobilenet_v2/config.json
.venv/bin/python samples/mobilenet_v2/evaluate.py \
    --fp32 samples/mobilenet_v2/mobilenet_v2.onnx \
    --int8 samples/mobilenet_v2/output/mobilenet_v2.q.onnx

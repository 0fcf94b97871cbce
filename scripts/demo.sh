#!/usr/bin/env bash
# Set up, train the example digits CNN on scikit-learn's digits, and compress it on this
# machine with the default config: demo-out/model.onnx (verified) and demo-out/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m examples.build demo-out/example --only digits
.venv/bin/compressor compress demo-out/example/digits.pt2 \
    --data demo-out/example/digits-data.safetensors --out demo-out "$@"

#!/usr/bin/env bash
# Set up, train the example digits CNN on scikit-learn's digits, and compress it on this
# machine with the default config (target mode: the smallest model whose top-1 class agrees
# with the original's on 99 % of the held-out digits): demo-out/model.onnx (verified) and
# demo-out/report.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m examples.build demo-out/example --only digits
.venv/bin/compressor compress demo-out/example/digits.pt2 \
    --data demo-out/example/digits-data.safetensors --out demo-out "$@"
# Everything was installed into .venv/, which is not on the PATH: say how to reach it.
cat <<'EOF'

The compressor command is installed in .venv/ (not on your PATH). Run it as
    .venv/bin/compressor --help
or activate the environment first, then use it as the README's tour does:
    source .venv/bin/activate
    compressor --help
EOF

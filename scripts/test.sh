#!/usr/bin/env bash
# Set up and run the whole test suite (slow and service tests included), plus the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/hadolint Dockerfile
.venv/bin/pytest "$@"

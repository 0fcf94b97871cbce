#!/usr/bin/env bash
# Set up and run the whole test suite (slow, service and browser tests included), plus the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The console's browser tests drive Debian's headless Chromium (never a downloaded browser).
command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
.venv/bin/ruff check .
.venv/bin/hadolint Dockerfile
# Two pytest-xdist workers, a test file each at a time (a file's module fixtures are built once);
# `-n 0` after it runs the tests in this process.
.venv/bin/pytest -n 2 --dist loadfile --durations=20 "$@"

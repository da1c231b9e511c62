#!/usr/bin/env bash
# The test command (README command B runs it after installing): lint, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check automoe tests scripts recipes
"$VENV/bin/ruff" format --check automoe tests scripts recipes
# One pytest worker per core, at most 4 (pytest-xdist): most of the suite's time is process start-up and gloo waits,
# which overlap. TEST_WORKERS=0 runs in one process.
WORKERS=${TEST_WORKERS:-$(( $(nproc) < 4 ? $(nproc) : 4 ))}
"$VENV/bin/python" -m pytest -q -n "$WORKERS" --dist worksteal --durations=15 "$@"

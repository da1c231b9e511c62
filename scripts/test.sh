#!/usr/bin/env bash
# The test command (README command B runs it after installing): lint, then the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check automoe tests scripts recipes
"$VENV/bin/ruff" format --check automoe tests scripts recipes
"$VENV/bin/python" -m pytest -q "$@"

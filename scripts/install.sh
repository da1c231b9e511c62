#!/usr/bin/env bash
# Create .venv and install automoe with its dev tools. On machines without a CUDA GPU, torch==2.13.0 (CPU) is
# installed first so no multi-GB CUDA build is pulled; GPU users keep the torch they bring (TORCH_SPEC overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install "${TORCH_SPEC:-torch==2.13.0}"
fi
$PIP install -e ".[${EXTRAS:-dev,hf}]"
"$VENV/bin/python" -c "import torch, automoe; print(f'automoe ready: torch {torch.__version__}')"

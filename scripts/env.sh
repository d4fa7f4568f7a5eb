#!/usr/bin/env bash
# Create or reuse ./.venv and install inductor-flex (editable) with its test extras.
# The CPU torch wheel (INDUCTOR_FLEX_TORCH, default torch==2.13.0) is installed only when no torch
# is importable: a CUDA user's torch (system site-packages are visible) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[env] no torch importable: installing ${INDUCTOR_FLEX_TORCH:-torch==2.13.0}"
  "$VPY" -m pip install -q "${INDUCTOR_FLEX_TORCH:-torch==2.13.0}"
fi
if ! "$VPY" -c "import inductor_flex, inductor_flex.lowering, inductor_flex.templates, pytest, hypothesis, triton, jinja2" >/dev/null 2>&1; then
  echo "[env] installing inductor-flex (editable) with test extras"
  "$VPY" -m pip install -q --no-build-isolation -e ".[test]"
fi

#!/usr/bin/env bash
# README command 2: set up (if needed) and run the test suite.
# Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by
# tests/conftest.py) and GPU-marked tests are deselected; on a CUDA machine pass `-m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
if .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MARK=${PYTEST_MARK:-gpu}
else
  MARK=${PYTEST_MARK:-not gpu}
fi
exec .venv/bin/python -m pytest tests -m "$MARK" -q -p no:cacheprovider "$@"

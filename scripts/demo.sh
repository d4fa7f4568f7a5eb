#!/usr/bin/env bash
# README command 1: set up (if needed) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m inductor_flex.demo "$@"

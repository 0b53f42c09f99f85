#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs every test (unit and 2-rank distributed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
DS_ACCELERATOR=cpu .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Install adt-ft with its test tools into .venv and run the test suite (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh test
VENV=${ADT_FT_VENV:-.venv}
ADT_FT_OFFLINE=1 "$VENV/bin/python" -m pytest "$@"

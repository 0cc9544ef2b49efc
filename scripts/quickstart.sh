#!/usr/bin/env bash
# Install adt-ft into .venv and run the whole pipeline on the embedded offline default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
VENV=${ADT_FT_VENV:-.venv}
exec "$VENV/bin/adt-ft" quickstart "$@"

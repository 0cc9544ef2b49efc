#!/usr/bin/env bash
# Install adt-ft into .venv and run the whole pipeline on the embedded offline default.
# The results go to ./workspace/ (models/, runs/, leaderboard/), not the repository's
# own leaderboard/ folder of committed results. Extra arguments go to `adt-ft quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
VENV=${ADT_FT_VENV:-.venv}
exec "$VENV/bin/adt-ft" quickstart --workspace workspace "$@"

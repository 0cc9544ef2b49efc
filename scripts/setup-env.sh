#!/usr/bin/env bash
# Make (or reuse) the virtual environment .venv with adt-ft installed, and make sure
# the offline Fashion-MNIST files are on the machine. Used by quickstart.sh, test.sh
# and CI. Usage: scripts/setup-env.sh [EXTRA]   (EXTRA: "test" adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADT_FT_VENV:-.venv}
PY=${PYTHON:-python3}
extra=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch/torchvision pinned to the builds this machine keeps on disk (plain pip takes
# them from there; any other resolver would download gigabytes of CUDA wheels).
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
if [ -n "$extra" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extra]"
else
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
fi
if [ "$extra" = test ] && [ ! -d "$VENV/isolated/torchattacks/torchattacks" ]; then
  # torchattacks (an independent implementation the attack tests compare against) ships its own
  # top-level robustbench/ and autoattack/ packages in its wheel: installed into the venv, it would
  # overwrite robustbench's files. It lives in a folder of its own that only tests/conftest.py reads.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$VENV/isolated/torchattacks" "torchattacks==3.5.1"
fi

# Real data, offline: Debian ships Fashion-MNIST as a package. Without root or apt,
# adt-ft falls back to torchvision's download when the machine is online.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }) ||
   echo "note: could not install Debian's dataset-fashion-mnist; adt-ft will try torchvision's download" >&2
fi

# The leaderboard site's browser test drives Debian's chromium through Debian's chromedriver
# (selenium never downloads a browser). Test tools only; only as root with apt.
if [ "$extra" = test ] && { [ ! -x /usr/bin/chromedriver ] || ! command -v chromium >/dev/null; } \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 ||
   { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }) ||
   echo "note: could not install Debian's chromium and chromium-driver; the browser test will be skipped" >&2
fi

#!/usr/bin/env bash
# Wall-clock speed-up of a sharded `adt-ft eval` on this machine's CPUs: the same evaluation
# under `torchrun --nproc-per-node 1` and `--nproc-per-node 2` (gloo, one thread per process),
# pyautoattack's ResNet-18 on foolbox's real CIFAR-10 images with --suite aa (no download), in
# 4 chunks. Prints each run's time, the ratios (world 1 and world 2 alternate, so that other
# load on a shared machine hits both alike) and checks that the per-example files are identical.
#
#   scripts/eval-speedup.sh [N_IMAGES (default 20, at most 20)] [REPEATS (default 1)]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${1:-20}
REPEATS=${2:-1}
if [ -x "$ROOT/.venv/bin/python" ]; then PY=${ADT_FT_PYTHON:-$ROOT/.venv/bin/python}; else PY=${ADT_FT_PYTHON:-python3}; fi
WORK=$(mktemp -d -t adt-ft-speedup.XXXXXX)
export ADT_FT_OFFLINE=1 ADT_FT_CONFIG_DIR="$WORK/config" OMP_NUM_THREADS=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

CKPT=$("$PY" - "$WORK/cifar10-images" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path
root = Path(sys.argv[1])
classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
for f in sorted((Path(importlib.util.find_spec("foolbox").origin).parent / "data").glob("cifar10_*.png")):
    label = int(f.stem.split("_")[2])  # cifar10_<index>_<label>.png
    (root / classes[label]).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, root / classes[label] / f.name)
print(Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples" / "model_test.pt")
EOF
)
# Four chunks: two per process in a world of 2.
CHUNK=$(( (N + 3) / 4 ))
ARGS=(eval --model "$CKPT" --arch pyautoattack.examples.resnet:ResNet18 --dataset "$WORK/cifar10-images" --suite aa
      -n "$N" --chunk-size "$CHUNK" -b "$CHUNK" --device cpu --no-progress -w "$WORK/ws" --overwrite)
LB="$WORK/ws/leaderboard/cifar10/Linf"
RATIOS=()
for r in $(seq "$REPEATS"); do
    declare -A WALL=()
    for world in 1 2; do
        start=$(date +%s.%N)
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$world" -m adt_finetune "${ARGS[@]}" \
            --entry "world$world" >"$WORK/world$world.log" 2>&1 || { cat "$WORK/world$world.log"; exit 1; }
        WALL[$world]=$(echo "$(date +%s.%N) - $start" | bc)
        echo "run $r, world $world: ${WALL[$world]} s wall (process starts included);" \
             "$(grep "attack time" "$WORK/world$world.log")"
    done
    cmp "$LB/world1.per-example.csv" "$LB/world2.per-example.csv" || exit 1
    RATIOS+=("$(echo "scale=2; ${WALL[1]} / ${WALL[2]}" | bc)")
done
echo "per-example files identical"
echo "speed-up world 2 / world 1: ${RATIOS[*]} ($N images, $(nproc --all) CPUs, load average now" \
     "$(cut -d' ' -f1-3 /proc/loadavg))"
rm -rf "$WORK"

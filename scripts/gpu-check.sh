#!/usr/bin/env bash
# The prepared GPU check: what adt-ft does on one GPU, in one script (a few minutes on one H200,
# at most 8 on a single modern GPU; no network, no dataset: the bench synthesises random inputs,
# and the script carries foolbox's 20 real CIFAR-10 test images and pyautoattack's ResNet-18).
# It prints
#
#   1. `adt-ft bench` of Zhang2019Theoretically's architecture (WRN-34-10, random weights) at
#      batch 128 in fp32 and in bf16 for every training method (pgd-at, trades, exp, exp-am,
#      imp-am, wdat): images/s, TFLOP/s, peak memory, and the bf16/fp32 speed ratio;
#   2. `adt-ft train` of one short epoch (--max-steps 2) under `torchrun --nproc-per-node 1`
#      with the NCCL backend (SKIP, with the reason, where this build does not train under torchrun);
#   3. pyautoattack's ResNet-18 on foolbox's CIFAR-10 images with `--suite aa`, evaluated on the
#      GPU under torchrun (NCCL) and on the CPU: the two per-example files must be identical;
#
# then a summary line per part; it exits 1 if a part failed.
#
#   scripts/gpu-check.sh                           on a machine with a GPU
#   ADT_FT_GPU_CHECK_SMOKE=1 scripts/gpu-check.sh  the CPU fallback the test suite runs: the same
#                                                  steps on the CPU at tiny sizes, gloo for NCCL,
#                                                  one FGSM step for AutoAttack
#   scripts/gpu-check.sh --prepare                 where PyPI is reachable: download into .whl/ the
#                                                  wheels a bare GPU image lacks (about 45 MB); carry
#                                                  .whl/ with the repository and the check installs them
#
# ADT_FT_GPU_CHECK_OUT=DIR keeps the logs, the bench JSON and the workspace there (default: a new
# temporary folder); ADT_FT_PYTHON picks the interpreter (default: .venv's, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=${ADT_FT_GPU_CHECK_SMOKE:-0}
if [ -x "$ROOT/.venv/bin/python" ]; then PY=${ADT_FT_PYTHON:-$ROOT/.venv/bin/python}; else PY=${ADT_FT_PYTHON:-python3}; fi

if [ "${1:-}" = "--prepare" ]; then
    # Pure-Python wheels, without their dependencies: the GPU image already has torch, numpy,
    # scipy, timm, requests, typer, rich, pyyaml, jinja2, filelock, pillow.
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$ROOT/.whl" \
        robustbench==1.1.1 pyautoattack==0.2.0 foolbox==3.3.4 gdown geotorch beautifulsoup4 soupsieve "setuptools<81"
fi

WORK=${ADT_FT_GPU_CHECK_OUT:-$(mktemp -d -t adt-ft-gpu-check.XXXXXX)}
mkdir -p "$WORK"
export ADT_FT_OFFLINE=1 ADT_FT_CONFIG_DIR="$WORK/config" PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # adt-ft from this checkout, installed or not

# What this check imports that a bare GPU image may lack, found without importing anything.
missing() {
    "$PY" -c "import importlib.util as u, sys; print(*[m for m in sys.argv[1:] if u.find_spec(m) is None])" \
        torch typer rich robustbench pyautoattack foolbox gdown geotorch pkg_resources
}
MISSING=$(missing)
if [ -n "$MISSING" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "installing the carried wheels (.whl/) into $WORK/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$ROOT"/.whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    MISSING=$(missing)
fi
if [ -n "$MISSING" ]; then
    echo "error: missing here: $MISSING. On a bare GPU machine: run 'scripts/gpu-check.sh --prepare' where PyPI" \
         "is reachable, and carry .whl/ with the repository"
    exit 1
fi
ADT=("$PY" -m adt_finetune)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)
WS="$WORK/ws"
LB="$WS/leaderboard/cifar10/Linf"
declare -A STATUS
section() { printf '\n=== %s ===\n' "$*"; }

# --- sizes: the real check, or the CPU fallback at tiny sizes --------------------------------
if [ "$SMOKE" = "1" ]; then
    DEV=cpu; BACKEND=gloo; ARCH=adt_finetune.models.small:SmallCNN; ARCH_ARGS=(--arch-kwargs '{"width": 4}')
    BENCH=(--batch-size 4 --steps 1 --warmup 1 --set gen_width=4)
    TRAIN=(--model scratch --arch "$ARCH" "${ARCH_ARGS[@]}" --dataset fashion-mnist --train-subset 16 --batch-size 8)
    EVAL=(--attacks fgsm -n 2)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    echo "CPU fallback (ADT_FT_GPU_CHECK_SMOKE=1): every step on the CPU at tiny sizes, gloo instead of NCCL"
else
    DEV=cuda; BACKEND=nccl; ARCH=Zhang2019Theoretically; ARCH_ARGS=()
    BENCH=(--batch-size 128 --steps 5 --warmup 1)
    TRAIN=(--model scratch --arch "$ARCH" --dataset "$WORK/cifar10-images" --batch-size 8)
    EVAL=(--suite aa -n 20)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
fi

# One interpreter start for: the versions, the GPU, foolbox's CIFAR-10 PNGs as an image folder
# (one subfolder per class; `adt-ft eval --dataset` checks the names), pyautoattack's checkpoint.
CKPT=$("$PY" - "$WORK/cifar10-images" "$DEV" <<'EOF'
import importlib.util, shutil, sys
from pathlib import Path
import torch
root, dev = Path(sys.argv[1]), sys.argv[2]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpu}", file=sys.stderr)
if dev == "cuda" and not torch.cuda.is_available():
    sys.exit("error: no CUDA device here; for the CPU fallback run ADT_FT_GPU_CHECK_SMOKE=1 scripts/gpu-check.sh")
classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
for f in sorted((Path(importlib.util.find_spec("foolbox").origin).parent / "data").glob("cifar10_*.png")):
    label = int(f.stem.split("_")[2])  # cifar10_<index>_<label>.png
    (root / classes[label]).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, root / classes[label] / f.name)
print(Path(importlib.util.find_spec("pyautoattack").origin).parent / "examples" / "model_test.pt")
EOF
) || exit 1
echo "output in $WORK"

# --- 1. bench: fp32 and bf16 -----------------------------------------------------------------
section "1. bench: $ARCH, every training method, fp32 and bf16 ($DEV)"
STATUS[bench]=OK
for dt in fp32 bf16; do
    "${ADT[@]}" bench --arch "$ARCH" "${ARCH_ARGS[@]}" --methods pgd-at,trades,exp,exp-am,imp-am,wdat --attacks none \
        "${BENCH[@]}" --device "$DEV" --dtype "$dt" --json "$WORK/bench-$dt.json" || STATUS[bench]=FAIL
done
if [ "${STATUS[bench]}" = OK ]; then
    "$PY" - "$WORK/bench-fp32.json" "$WORK/bench-bf16.json" <<'EOF' || STATUS[bench]=FAIL
import json, sys
def label(r):  # a method that takes either loss is named with it unless it is CE
    return r["name"] if r.get("loss") in (None, "ce", r["name"]) else f"{r['name']}/{r['loss']}"
f32, b16 = ({label(r): r for r in json.load(open(p))["rows"]} for p in sys.argv[1:3])
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
print(f"{'method':14} {'img/s fp32':>11} {'img/s bf16':>11} {'bf16/fp32':>10} {'TFLOP/s fp32':>13} "
      f"{'TFLOP/s bf16':>13} {'peak MB fp32':>13} {'peak MB bf16':>13}")
for name in f32:
    a, b = f32[name], b16[name]
    speed = b["images_per_s"] / a["images_per_s"] if a["images_per_s"] and b["images_per_s"] else None
    print(f"{name:14} {fmt(a['images_per_s'], '11.1f')} {fmt(b['images_per_s'], '11.1f')} {fmt(speed, '10.2f')} "
          f"{fmt(a['tflops'], '13.3g')} {fmt(b['tflops'], '13.3g')} {fmt(a['peak_mem_mb'], '13.0f')} "
          f"{fmt(b['peak_mem_mb'], '13.0f')}")
EOF
fi

# --- 2. train one short epoch under torchrun ---------------------------------------------------
section "2. train: torchrun --nproc-per-node 1 ($BACKEND), pgd-at, one epoch cut at --max-steps 2"
if "${TORCHRUN[@]}" -m adt_finetune train "${TRAIN[@]}" --method pgd-at --epochs 1 --max-steps 2 --device "$DEV" \
        --run-name torchrun-check --no-progress -w "$WS" >"$WORK/train.log" 2>&1; then
    tail -n 12 "$WORK/train.log"
    # A build that trains under torchrun records the world it trained in; an older one ran one plain process.
    STATUS[train]=$("$PY" - "$WS/runs/torchrun-check/run.json" <<'EOF'
import json, sys
run = json.load(open(sys.argv[1]))
found = {k: v for k, v in run.items() if k in ("world_size", "backend", "global_batch_size", "distributed")}
print(f"OK {json.dumps(found)}" if found else "SKIP (this build does not train under torchrun yet: it ran as one "
      "plain process and run.json records no world size)")
EOF
)
else
    grep -v '^\s*$' "$WORK/train.log" | tail -n 15
    STATUS[train]="FAIL (see $WORK/train.log)"
fi

# --- 3. AutoAttack on real CIFAR-10 images: the GPU's flags are the CPU's -----------------------
section "3. eval: pyautoattack's ResNet-18 on foolbox's CIFAR-10 images, ${EVAL[*]}, $DEV under torchrun vs cpu"
COMMON=(eval --model "$CKPT" --arch pyautoattack.examples.resnet:ResNet18 --dataset "$WORK/cifar10-images"
        "${EVAL[@]}" --no-progress -w "$WS" --overwrite)
if "${TORCHRUN[@]}" -m adt_finetune "${COMMON[@]}" --device "$DEV" --entry on-"$DEV" >"$WORK/eval-torchrun.log" 2>&1 &&
        "${ADT[@]}" "${COMMON[@]}" --device cpu --entry on-cpu-alone >"$WORK/eval-alone.log" 2>&1; then
    cat "$WORK/eval-torchrun.log"
    if cmp -s "$LB/on-$DEV.per-example.csv" "$LB/on-cpu-alone.per-example.csv"; then
        STATUS[eval]="OK (identical per-example flags: $DEV under torchrun and cpu alone)"
    else
        diff "$LB/on-$DEV.per-example.csv" "$LB/on-cpu-alone.per-example.csv" | head -20
        STATUS[eval]="FAIL (the per-example flags differ between $DEV and cpu)"
    fi
else
    grep -v '^\s*$' "$WORK"/eval-*.log | tail -n 20
    STATUS[eval]="FAIL (see $WORK/eval-*.log)"
fi

section "summary"
failed=0
for part in bench train eval; do
    echo "$part: ${STATUS[$part]}"
    case "${STATUS[$part]}" in FAIL*) failed=1 ;; esac
done
exit $failed

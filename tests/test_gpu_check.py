"""scripts/gpu-check.sh, the prepared GPU check, runs its CPU fallback end to end: bench in fp32
and bf16, a torchrun training step, and the same evaluation under torchrun and alone with
identical per-example files. On a GPU machine the same script runs the real sizes."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_fallback_runs_every_part(tmp_path):
    out_dir = tmp_path / "gpu-check"
    env = dict(os.environ, ADT_FT_GPU_CHECK_SMOKE="1", ADT_FT_GPU_CHECK_OUT=str(out_dir), ADT_FT_PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    for title in ("=== 1. bench", "=== 2. train: torchrun --nproc-per-node 1 (gloo)", "=== 3. eval", "=== summary"):
        assert title in out, (title, out[-3000:], proc.stderr[-2000:])
    # The bench's fp32/bf16 comparison: a row per method (and loss) with both speeds and their ratio.
    for method in ("pgd-at", "trades", "exp", "exp-am", "exp-am/trades", "imp-am", "wdat/trades"):
        row = re.search(rf"^{method}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s", out, re.MULTILINE)
        assert row, (method, out[-3000:])
        fp32, bf16, ratio = map(float, row.groups())
        assert fp32 > 0 and bf16 > 0 and ratio == pytest.approx(bf16 / fp32, rel=0.02, abs=0.01)
    assert "bench: OK" in out
    # Training under torchrun either records its world (OK) or says it is not implemented (SKIP).
    assert re.search(r"^train: (OK|SKIP)", out, re.MULTILINE), out[-3000:]
    assert "eval: OK (identical per-example flags: cpu under torchrun and cpu alone)" in out
    lb = out_dir / "ws" / "leaderboard" / "cifar10" / "Linf"
    assert (lb / "on-cpu.per-example.csv").read_bytes() == (lb / "on-cpu-alone.per-example.csv").read_bytes()
    assert proc.returncode == 0, out[-3000:]

"""What a benchmark returns: one `BenchRow` per item, the run's metadata, the JSON
file (schema "adt-ft-bench/1", fields in docs/bench.md) and the ratios to the baselines."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..utils import atomic_write_json
from .bench_config import ATTACK_BASELINE, METHOD_BASELINE

NOT_IMPLEMENTED = "not implemented in this build"


@dataclass
class BenchRow:
    kind: str
    name: str
    loss: str | None
    status: str = "ok"
    images_per_s: float | None = None
    step_time_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    step_cpu_s: float | None = None
    forward_passes: int | None = None
    backward_passes: int | None = None
    forward_images: int | None = None
    module_passes: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_mem_mb: float | None = None
    baseline: str | None = None
    ratio_to_pgd_at: float | None = None
    ratio_to_pgd20: float | None = None
    ratio: float | None = None
    cpu_ratio: float | None = None
    predicted_ratio: float | None = None
    predicted_flops: float | None = None
    predicted_flops_by_module: dict[str, float] = field(default_factory=dict)
    counted_flops: float | None = None
    tflops: float | None = None
    prepare_s: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    meta: dict[str, Any]
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "rows": [asdict(r) for r in self.rows]}

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    def row(self, kind: str, name: str, loss: str | None = None) -> BenchRow:
        for r in self.rows:
            if r.kind == kind and r.name == name and (loss is None or r.loss == loss):
                return r
        raise KeyError((kind, name, loss))


def clear_numbers(row: BenchRow) -> None:
    """Drop every measured number of a row whose item failed part-way."""
    for k in ("images_per_s", "step_time_s", "step_cpu_s", "forward_passes", "backward_passes", "forward_images",
              "peak_mem_mb", "predicted_flops", "counted_flops", "tflops"):
        setattr(row, k, None)
    row.step_times_s, row.module_passes, row.predicted_flops_by_module = [], {}, {}


def fill_ratios(rows: list[BenchRow]) -> None:
    """Each row's measured and predicted ratio to its group's baseline from the same run."""
    def ok(r):
        return r.status == "ok" and r.step_time_s is not None

    base_m = next((r for r in rows if r.kind == "method" and r.name == METHOD_BASELINE and ok(r)), None)
    base_a = next((r for r in rows if r.kind == "attack" and r.name == ATTACK_BASELINE and ok(r)), None)
    for r in rows:
        base = base_m if r.kind == "method" else base_a
        if not ok(r) or base is None:
            continue
        r.ratio = r.step_time_s / base.step_time_s
        if r.step_cpu_s is not None and base.step_cpu_s:
            r.cpu_ratio = r.step_cpu_s / base.step_cpu_s
        if r.kind == "method":
            r.ratio_to_pgd_at = r.ratio
        else:
            r.ratio_to_pgd20 = r.ratio
        if r.predicted_flops is not None and base.predicted_flops:
            r.predicted_ratio = r.predicted_flops / base.predicted_flops
    if base_m is None and any(r.kind == "method" and ok(r) for r in rows):
        for r in rows:
            if r.kind == "method" and ok(r):
                r.note = join_notes(r.note, f"no ratio: {METHOD_BASELINE} did not run")


def join_notes(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else a or b

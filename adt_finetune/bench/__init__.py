"""Throughput benchmark: every training method and attack measured side by side on
random inputs of a dataset's shapes (no download): time per step, images/s, the
classifier's forward/backward passes, peak memory, the ratio to the baseline
(pgd-at, pgd20) from the same run, and a FLOP cost model's predicted ratio.

What a step is, how items are timed, the cost model and the JSON's fields:
docs/bench.md. `adt-ft bench` draws the table.

    from adt_finetune.bench import run_benchmark
    result = run_benchmark("adt_finetune.models.small:SmallCNN", dataset="fashion-mnist", attacks=[])
    result.row("method", "exp-am", "ce").ratio

The settings and results modules import no torch (the CLI reads the defaults while it
starts); the names that need torch load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .results import BenchResult, BenchRow
from .bench_config import (ATTACK_BASELINE, CPU_DEFAULT_ATTACKS, CPU_DEFAULT_OVERRIDES, DEFAULT_ARCH,
                           METHOD_BASELINE, PAPER_ATTACKS, SCHEMA, default_dataset, parse_list, parse_overrides)

_LAZY = {
    "run_benchmark": "runner",
    "build_model": "model",
    "GlobalFlopCounter": "cost",
    "PEAK_MEM_MEANING": "memory",
    "device_name": "memory",
}

__all__ = ["ATTACK_BASELINE", "BenchResult", "BenchRow", "CPU_DEFAULT_ATTACKS", "CPU_DEFAULT_OVERRIDES",
           "DEFAULT_ARCH", "METHOD_BASELINE", "PAPER_ATTACKS", "SCHEMA",
           "default_dataset", "parse_list", "parse_overrides", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

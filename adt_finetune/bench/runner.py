"""`run_benchmark`: check the request, then measure the method group and the attack group."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..attacks import ATTACKS
from ..config import TrainConfig, coerce_setting
from ..data import DatasetInfo, dataset_info
from ..errors import UserError
from ..methods import LOSSES, METHODS, check_loss
from ..precision import check_dtype
from ..progress import Reporter, as_reporter
from ..utils import check_seed
from .items import attack_item, method_item
from .model import bench_device
from .results import BenchResult, BenchRow, fill_ratios
from .bench_session import BenchSession
from .bench_config import (ATTACK_BASELINE, CPU_DEFAULT_ATTACKS, CPU_DEFAULT_OVERRIDES, METHOD_BASELINE,
                           PAPER_ATTACKS, pick)
from .timing import run_group


def run_benchmark(
    arch: str,
    *,
    dataset: str = "cifar10",
    methods: Sequence[str] | None = None,
    losses: Sequence[str] = LOSSES,
    attacks: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    steps: int = 5,
    warmup: int = 1,
    seed: int = 0,
    arch_kwargs: dict | None = None,
    config_overrides: dict[str, Any] | None = None,
    strict: bool = False,
    reporter: Reporter | None = None,
) -> BenchResult:
    """Benchmark `methods` (each with every loss in `losses` it accepts) and `attacks`.

    `methods=None` means every known method and `attacks=None` the device's
    default list (docs/bench.md); pass `[]` to skip a group. The baselines
    (pgd-at, pgd20) are added when their group is benchmarked, because ratios are
    measured against them in the same run. `config_overrides` sets TrainConfig
    fields for the methods (e.g. `{"gen_width": 64}`), on top of the device's
    defaults (`CPU_DEFAULT_OVERRIDES` on CPU, none on GPU). `warmup` counts the
    untimed steps; the first of them is always run (it is the FLOP-counting step).
    Every registered method and attack can be named; one whose step raises NotImplementedError
    is kept as a row with status "skipped"; an item that raises otherwise becomes status "error" (or raises,
    with `strict`). `reporter` hears which item is being set up and timed.
    """
    dev, dtype, info = _check_run(batch_size, steps, warmup, device, dtype, dataset, losses)
    check_seed(seed)
    method_names = _with_baseline(pick(methods, METHODS, "method", list(METHODS)), METHOD_BASELINE)
    default_attacks = PAPER_ATTACKS if dev.type == "cuda" else CPU_DEFAULT_ATTACKS
    attack_names = _with_baseline(pick(attacks, ATTACKS, "attack", default_attacks), ATTACK_BASELINE)
    overrides = _settings(dev, config_overrides)
    base_cfg = TrainConfig().updated({**overrides, "dataset": info.name, "batch_size": int(batch_size),
                                      "seed": seed, "device": str(dev), "amp": dtype != "fp32"})
    rep = as_reporter(reporter)
    with rep:
        session = BenchSession(arch, info, arch_kwargs, dev, dtype, int(batch_size), channels_last, compile,
                               int(steps), int(warmup), seed, strict)
        try:
            session.set_scope(base_cfg.scope)
            meta = {**session.meta(), "config_overrides": overrides}
            rows = _run_methods(session, method_names, losses, base_cfg, rep.message)
            rows += _run_attacks(session, attack_names, rep.message)
        finally:
            session.close()
    fill_ratios(rows)
    return BenchResult(meta, rows)


def _check_run(batch_size: int, steps: int, warmup: int, device: str | torch.device, dtype: str, dataset: str,
               losses: Sequence[str]) -> tuple[torch.device, str, DatasetInfo]:
    """UserError for a request that cannot run, before anything is built."""
    if int(batch_size) < 1:
        raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
    if int(steps) < 1:
        raise UserError(f"`steps` must be at least 1, got {steps}")
    if int(warmup) < 0:
        raise UserError(f"`warmup` must be 0 or more, got {warmup}")
    dev = bench_device(device)
    dtype = check_dtype(dev, dtype)
    info = dataset_info(dataset)
    for loss in losses:
        check_loss(loss)
    return dev, dtype, info


def _with_baseline(names: list[str], baseline: str) -> list[str]:
    """A benchmarked group always runs its baseline first: its ratios are measured against it."""
    return names if not names or baseline in names else [baseline, *names]


def _settings(dev: torch.device, config_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The methods' TrainConfig settings: the device's defaults, then the caller's, type-checked."""
    given = dict(config_overrides or {})
    for chosen in ("method", "loss"):
        if chosen in given:
            raise UserError(f"setting {chosen!r} is chosen by the benchmark: use `methods` / `losses`")
    unknown = sorted(set(given) - TrainConfig.field_names())
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r}: valid settings are the options of 'adt-ft train `help`'")
    given = {k: coerce_setting(k, v, f"--set {k}={v}") for k, v in given.items()}
    return {**(CPU_DEFAULT_OVERRIDES if dev.type == "cpu" else {}), **given}


def _run_methods(s: BenchSession, names: list[str], losses: Sequence[str], base_cfg: TrainConfig,
                 say: Callable[[str], None]) -> list[BenchRow]:
    rows: list[BenchRow] = []
    items = []
    for name in names:
        accepted = tuple(METHODS[name].accepts_loss)
        # A method with one intrinsic loss (pgd-at: ce, trades: trades) runs with it even
        # when `losses` names only the other: the baseline must run, and silently dropping
        # the pointwise TRADES row would hide a method the user asked for.
        for loss in [l for l in losses if l in accepted] or [accepted[0]]:
            items.append(method_item(s, base_cfg.updated({"method": name, "loss": loss})))
            rows.append(items[-1][0])
    run_group(s, items, say)
    return rows


def _run_attacks(s: BenchSession, names: list[str], say: Callable[[str], None]) -> list[BenchRow]:
    if names:
        s.prepare_attack_inputs()
    rows: list[BenchRow] = []
    items = []
    for name in names:
        items.append(attack_item(s, name))
        rows.append(items[-1][0])
    run_group(s, items, say)
    return rows

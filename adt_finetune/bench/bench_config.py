"""What the benchmark runs: the item lists, their defaults and baselines, and the
command-line forms of both (`--methods a,b`, `--set KEY=VALUE`).

Nothing here imports torch, so the CLI can read the defaults while it starts.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..errors import UserError
from ..zoo.catalog import resolve_name

SCHEMA = "adt-ft-bench/1"
# Which methods and attacks exist is their registries' business (`methods.METHODS`, `attacks.ATTACKS`):
# by default every registered method is benchmarked, in registration order; the attack defaults below
# are the benchmark's choice of what is worth timing by default. exp-am / imp-am as attacks first
# train a generator on training images (and the -cotrained ones need a run's generator), so their cost
# is not one batch's: they are not in a default list.
PAPER_ATTACKS = ("fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack")
# feature (200 targets × 50 steps), autoattack and spsa take minutes per batch on a CPU (docs/bench.md).
CPU_DEFAULT_ATTACKS = ("fgsm", "pgd20", "pgd100", "mim", "cw")
# The paper's generator (width 256, residual blocks of 512) costs ~16–21 GFLOP per
# image forward, far more than a small classifier: at full width the amortised
# methods alone take minutes per CPU step. The CPU default narrows it (shown in the
# table's caption and the JSON); `--set gen_width=256` restores the paper's width.
CPU_DEFAULT_OVERRIDES = {"gen_width": 32}
METHOD_BASELINE = "pgd-at"
ATTACK_BASELINE = "pgd20"
DEFAULT_ARCH = "adt_finetune.models.small:SmallCNN"
DEFAULT_ARCH_DATASET = "fashion-mnist"
# Enough images of every class for attacks that draw targets from the pool (feature: 200 per image).
PREPARE_POOL = 512


def default_dataset(arch: str) -> str:
    """The dataset whose shapes an architecture is measured on when none is named: a zoo name's own
    (CIFAR-10 first; an ImageNet-only name such as Salman2020Do_R50 is measured at 224×224)."""
    if arch == DEFAULT_ARCH:
        return DEFAULT_ARCH_DATASET
    if ":" not in arch:
        for dataset in ("cifar10", "cifar100", "imagenet"):
            try:
                resolve_name(arch, dataset, "Linf")
                return dataset
            except UserError:
                continue
    return "cifar10"


def pick(names: Iterable[str] | None, registry: Mapping, what: str, default: Sequence[str]) -> list[str]:
    """The items of one group: `default` for None, none for [] or ["none"], else the
    named ones in order, each once; a name not in `registry` is a UserError listing the choices."""
    if names is None:
        return list(default)
    names = list(names)
    if not names or [n.strip().lower() for n in names] == ["none"]:
        return []  # the group is not benchmarked
    out: list[str] = []
    for n in names:
        n = n.strip()
        if not n:
            continue
        if n not in registry:
            raise UserError(f"unknown {what} {n!r}: choose from {', '.join(sorted(registry))}")
        if n not in out:
            out.append(n)
    return out


def parse_list(text: str | None) -> list[str] | None:
    """'a,b, c' -> ['a', 'b', 'c']; None stays None (the default list)."""
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings (values read as YAML scalars: 64, 0.1, true) into a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"`set` {item!r}: write KEY=VALUE, e.g. `set` gen_width=64")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"`set` {item!r}: cannot read the value {value!r}") from None
    return out

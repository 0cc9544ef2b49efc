"""Attack suites and attack names: what `--suite` and `--attacks` may say.

Names are checked against the attack registry when a list is parsed, not at
import time, so an attack registered by a later import is accepted.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import UserError

PAPER = ["clean", "fgsm", "pgd20", "pgd100", "mim", "cw", "feature", "autoattack"]
SUITES: dict[str, list[str]] = {
    "paper": PAPER,
    "aa": ["clean", "autoattack"],
    # AutoAttack's parts one by one beside PGD-20 (run it in independent mode): the gradient-masking
    # check compares the gradient-free square with every white-box part on each example
    "aa-parts": ["clean", "pgd20", "apgd-ce", "apgd-t", "fab-t", "square"],
    "quick": ["clean", "fgsm", "pgd20"],
    # + the run's co-trained generator, see suite_attacks
    "full": PAPER + ["spsa", "exp", "exp-am", "imp-am"],
    "wasserstein": ["clean", "wasserstein"],
}
MODES = ("independent", "cascade")
#: pseudo-attack names: `clean` is always evaluated; `wasserstein` is the W-PGD budget grid
PSEUDO = ("clean", "wasserstein")
#: the methods whose runs save an amortised generator (generator.pt)
GENERATOR_ATTACKS = ("exp-am", "imp-am")
#: the attack that draws from a run's own generator, per method
COTRAINED_ATTACKS = {method: f"{method}-cotrained" for method in GENERATOR_ATTACKS}


def check_mode(mode: str) -> str:
    """The one check of an evaluation mode."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose independent or cascade")
    return mode


def valid_attack_names() -> list[str]:
    from ..attacks import ATTACKS

    return list(PSEUDO) + sorted(ATTACKS)


def split_attack_list(text: str) -> list[str]:
    """'fgsm, pgd20,cw' -> ['clean', 'fgsm', 'pgd20', 'cw'] (the names are checked where the evaluation's
    settings are built, `EvalSettings`)."""
    names = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError("`attacks` is empty: give a comma-separated list such as fgsm,pgd20")
    return ["clean"] + [n for n in names if n != "clean"]


def parse_attack_list(text: str) -> list[str]:
    """`split_attack_list`, validated against the registry."""
    return check_attack_names(split_attack_list(text))


def check_attack_names(names: Sequence[str]) -> list[str]:
    """The one check of a list of attack names: registered (or a pseudo-attack), each once."""
    valid = valid_attack_names()
    for n in names:
        if n not in valid:
            raise UserError(f"unknown attack {n!r}: choose from {', '.join(valid)}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise UserError(f"attack {n!r} is listed twice")
        seen.add(n)
    return list(names)


def suite_attacks(suite: str, *, generator_method: str | None = None) -> list[str]:
    """The attack names of a suite, in order. `full` adds the run's co-trained
    generator (`exp-am-cotrained` or `imp-am-cotrained`) when the run trained one."""
    key = str(suite).strip().lower()
    if key not in SUITES:
        raise UserError(f"unknown suite {suite!r}: choose from {', '.join(SUITES)}")
    names = list(SUITES[key])
    if key == "full" and generator_method in COTRAINED_ATTACKS:
        names.append(COTRAINED_ATTACKS[generator_method])
    return names


def needs_training_data(names: Sequence[str], *, required_only: bool = False) -> list[str]:
    """The attacks among `names` that learn from training images before they attack
    (with `required_only`, those that cannot do without them)."""
    from ..attacks import ATTACKS

    found = [n for n in names if n in ATTACKS and ATTACKS[n].uses_training_data]
    if required_only:
        found = [n for n in found if not ATTACKS[n].training_data_optional]
    return found

"""The attack interface and registry.

An attack is a small object built from ε and its settings; calling it on
(model, x, y) returns an AttackResult: a representative adversarial input per
example (always inside the ε-ball and [0, 1]) and a per-example robust flag
(still classified correctly). Attacks that are "broken if any copy is
misclassified" (feature, exp, spsa's early stop) set the flag themselves and
return the copy that broke the example.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..nets import eval_mode


@dataclass
class AttackResult:
    x_adv: torch.Tensor   # (B, C, H, W) in [0, 1], ‖x_adv − x‖∞ ≤ ε
    robust: torch.Tensor  # (B,) bool


class Attack:
    name: ClassVar[str] = ""
    #: the model's gradients are not used (black-box); for the gradient-masking check
    black_box: ClassVar[bool] = False
    #: `eval --amp` may run the search under autocast: the search takes no decision from
    #: the model's output (no early stop, no pick among copies), so the fp32 verdict on
    #: the returned x' is the whole result. Attacks that decide from reduced-precision
    #: logits (stop once "broken", return the "worst" sample) keep fp32.
    amp_search: ClassVar[bool] = False

    def __init__(self, eps: float, *, seed: int = 0, **settings: Any):
        self.eps = float_setting(self.name, "eps", eps)
        if self.eps > 1:
            raise UserError(f"attack {self.name!r}: ε {eps!r} is outside [0, 1]: images live in [0, 1]")
        self.seed = int_setting(self.name, "seed", seed)
        if settings:
            raise UserError(f"attack {self.name!r} has no setting {next(iter(settings))!r}")

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called once with the whole evaluation set before any batch (e.g. the
        feature attack computes its target pool's features here, once)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        # Eval mode for the attack and the verdict alike: BatchNorm's batch statistics
        # would let one example's perturbation change another's prediction.
        with eval_mode(model):
            x_adv = self.perturb(model, x, y)
            with torch.no_grad():
                robust = model(x_adv).argmax(1) == y
        return AttackResult(x_adv, robust)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The settings this attack ran with, recorded in results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def int_setting(attack: str, name: str, value: Any, minimum: int = 0) -> int:
    """A whole-number setting (recipes and the CLI may give it as text); UserError otherwise."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise UserError(f"attack {attack!r}: {name} must be a whole number >= {minimum}, got {value!r}")
    return number


def float_setting(attack: str, name: str, value: Any, minimum: float = 0.0) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not (number >= minimum and number != float("inf")):
        raise UserError(f"attack {attack!r}: {name} must be a number >= {minimum}, got {value!r}")
    return number


def bool_setting(attack: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"attack {attack!r}: {name} must be true or false, got {value!r}")


def example_seeds(x: torch.Tensor, key: str) -> list[int]:
    """One seed per example from `key` (attack name and seed) and the example's pixels.

    Attacks draw each example's randomness from its own seed, so an example's result
    does not depend on which batch it sits in: batch size does not change a number,
    and `cascade` (only still-robust examples) agrees with `independent`.
    """
    salt = hashlib.blake2b(key.encode(), digest_size=16).digest()
    rows = x.detach().to("cpu", torch.float32).reshape(len(x), -1).contiguous().numpy()
    return [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=salt).digest(), "little") >> 1
            for row in rows]


def example_generators(x: torch.Tensor, key: str) -> list[torch.Generator]:
    """A torch.Generator on x's device per example, seeded by `example_seeds`."""
    return [torch.Generator(device=x.device).manual_seed(s) for s in example_seeds(x, key)]


ATTACKS: dict[str, Callable[..., Attack]] = {}


def register_attack(name: str):
    """Class decorator: make an attack available by name (recipes, --attacks)."""

    def deco(cls):
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def make_attack(name: str, eps: float, **settings: Any) -> Attack:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}: choose from {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](eps, **settings)

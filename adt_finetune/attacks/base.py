"""The attack interface and registry.

An attack is a small object built from ε and its settings; calling it on
(model, x, y) returns an AttackResult: a representative adversarial input per
example (always inside the ε-ball and [0, 1]) and a per-example robust flag
(still classified correctly). Attacks that are "broken if any copy is
misclassified" (feature, exp, spsa's early stop) set the flag themselves and
return the copy that broke the example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import UserError


@dataclass
class AttackResult:
    x_adv: torch.Tensor   # (B, C, H, W) in [0, 1], ‖x_adv − x‖∞ ≤ ε
    robust: torch.Tensor  # (B,) bool


class Attack:
    name: ClassVar[str] = ""
    #: the model's gradients are not used (black-box); for the gradient-masking check
    black_box: ClassVar[bool] = False

    def __init__(self, eps: float, *, seed: int = 0, **settings: Any):
        self.eps = float(eps)
        self.seed = seed
        if settings:
            raise UserError(f"attack {self.name!r} has no setting {next(iter(settings))!r}")

    def prepare(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called once with the whole evaluation set before any batch (e.g. the
        feature attack computes its target pool's features here, once)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        x_adv = self.perturb(model, x, y)
        with torch.no_grad():
            robust = model(x_adv).argmax(1) == y
        return AttackResult(x_adv, robust)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The settings this attack ran with, recorded in results."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


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

"""`wpgd`: the Wasserstein distributional attack (docs/evaluation.md, "Distributional robustness") behind the attack interface.

It is dataset-level: the budget is shared by the whole evaluation set, so the
evaluation engine must pass every example in one call (`dataset_level = True`)
and the result depends on which examples are attacked together. Its x_adv is
not inside the pointwise ε-ball: single images may move further than the
budget while others stay put (`linf_bounded = False` tells the engine's
ε-ball sanity check to skip it). The algorithm lives in `adt_finetune.perturb.distributional`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..perturb import distributional as W
from .base import Attack, AttackResult, register_attack


@register_attack("wpgd")
class WPGD(Attack):
    dataset_level = True
    linf_bounded = False

    def __init__(self, eps: float, *, seed: int = 0, budget: float | str | None = None, q: int = 2,
                 steps: int = 50, ratio: float = 1.875, loss: str = "redlr", batch_size: int = 256,
                 **settings: Any):
        super().__init__(eps, seed=seed, **settings)
        self.budget = self.eps if budget is None else W.parse_budgets([budget])[0]
        self.q = W._check_q(q)
        W.resolve_loss(loss)
        self.loss = str(loss).lower()
        if int(steps) < 1:
            raise UserError(f"wpgd needs at least one step, got {steps}")
        if not float(ratio) > 0:
            raise UserError(f"the wpgd step ratio must be positive, got {ratio}")
        if int(batch_size) < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        self.steps = int(steps)
        self.ratio = float(ratio)
        self.batch_size = int(batch_size)
        #: W_2 (q = 2) or W_∞ distance of the last result, for the report
        self._last_distance: float | None = None

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        res = W.wpgd(model, x, y, budget=self.budget, q=self.q, steps=self.steps, ratio=self.ratio, loss=self.loss,
                     batch_size=self.batch_size, device=x.device)
        self._last_distance = res.distance
        return AttackResult(res.x_adv, res.robust)

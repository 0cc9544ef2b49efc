"""`wdat`: Wasserstein-distributional TRADES fine-tuning (docs/methods.md, "wdat").

Per mini-batch, the W-PGD map (q = 2, l∞ ground cost) moves the batch inside
the W_2 ball of radius δ around it, sharing the budget across the batch's
images; the classifier then minimises CE(f(x), y) + β·KL(f(x) ‖ f(x')).

Choices (the paper's exact ones are not available; all settable):
- Inner objective: as in TRADES, the map ascends the per-example
  KL(f(x) ‖ f(x')) against the clean prediction, computed in eval mode and
  detached. The KL and its gradient vanish at x' = x and W-PGD has no random
  start, so the map starts from TRADES' x + 0.001·N(0, I). With `--loss ce`
  the map ascends CE(f(x'), y) from x and the model minimises CE(f(x'), y):
  a distributional PGD-AT. TRADES is the method's own loss (`default_loss`).
- Υ: `--upsilon batch` divides by the batch's own Υ_t at each inner step t (the
  dataset-level attack restricted to the batch). `--upsilon ema` divides by
  sqrt of an exponential moving average, across batches, of the batch mean
  ‖g_i‖_1² at inner step t (one average per t, because the gradient scale
  changes along the path), so the per-image step follows the dataset-wide
  sensitivity rather than the batch's. The averages are part of the state dict.
  Under torchrun both are over the whole (global) batch: each inner step sums
  ‖g_i‖_1² and the count over the processes, so every process divides by the
  same Υ_t, the one a single process with the whole batch would use.
- Budget `wdat_budget` (None: the dataset's ε), `wdat_steps` inner steps of
  `wdat_ratio`·δ/`wdat_steps`. The projection is per batch: each batch's
  empirical distribution stays within δ of itself in W_2. Under torchrun it is
  per process's share of the batch, a tighter constraint (each share within δ
  puts the whole batch within δ).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from ..nets import eval_mode
from ..perturb.linf import accuracy
from ..perturb.distributional import parse_budgets, wpgd_map
from .base import MethodContext, StepOutput, TrainMethod, register_method
from .losses import trades_kl, trades_target, training_loss

TRADES_START_STD = 0.001


@register_method("wdat")
class WDAT(TrainMethod):
    accepts_loss: ClassVar[tuple[str, ...]] = ("trades", "ce")
    #: the loss the method is defined with; front ends may default --loss to it
    default_loss: ClassVar[str] = "trades"

    def __init__(self, cfg: TrainConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.budget = float(ctx.eps) if cfg.wdat_budget in (None, "") else parse_budgets([cfg.wdat_budget])[0]
        if int(cfg.wdat_steps) < 1:
            raise UserError(f"--wdat-steps must be at least 1, got {cfg.wdat_steps}")
        if not float(cfg.wdat_ratio) > 0:
            raise UserError(f"--wdat-ratio must be positive, got {cfg.wdat_ratio}")
        if cfg.upsilon not in ("batch", "ema"):
            raise UserError(f"unknown --upsilon {cfg.upsilon!r}: choose batch or ema")
        if not 0.0 <= float(cfg.upsilon_momentum) < 1.0:
            raise UserError(f"--upsilon-momentum must be in [0, 1), got {cfg.upsilon_momentum}")
        self.steps = int(cfg.wdat_steps)
        self.ratio = float(cfg.wdat_ratio)
        self.momentum = float(cfg.upsilon_momentum)
        # One running mean of ‖g_i‖_1² per inner step; `seen` marks which have a value
        # (the first batch initialises them instead of averaging with zero).
        self.upsilon_sq = torch.zeros(self.steps, dtype=torch.float64)
        self.upsilon_seen = torch.zeros(self.steps, dtype=torch.bool)
        # Own generator for the start noise, saved with the state so resume is exact.
        self.generator = torch.Generator().manual_seed(int(cfg.seed) + 0x5DA7)

    # -------------------------------------------------------------- the inner map

    def _batch_sq(self, l1_norms: torch.Tensor) -> float:
        """The batch mean of ‖g_i‖_1², over every process's share of the batch under torchrun."""
        sq = l1_norms.double().pow(2)
        if self.ctx.all_reduce is None:
            return float(sq.mean())
        total = torch.stack([sq.sum(), torch.tensor(float(len(sq)), dtype=torch.float64, device=sq.device)])
        self.ctx.all_reduce(total)
        return float(total[0] / total[1])

    def _global_upsilon(self, t: int, l1_norms: torch.Tensor) -> float:
        return math.sqrt(self._batch_sq(l1_norms))

    def _ema_upsilon(self, t: int, l1_norms: torch.Tensor) -> float:
        batch_sq = self._batch_sq(l1_norms)
        if self.upsilon_seen[t]:
            self.upsilon_sq[t] = self.momentum * self.upsilon_sq[t] + (1 - self.momentum) * batch_sq
        else:
            self.upsilon_sq[t] = batch_sq
            self.upsilon_seen[t] = True
        return float(self.upsilon_sq[t].sqrt())

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """x' from the W-PGD map on this batch, found with the classifier in eval mode
        (`target`: the eval-mode clean logits, the KL reference of the TRADES loss)."""
        if self.cfg.upsilon == "ema":
            upsilon = self._ema_upsilon
        else:  # the batch's own Υ_t: wpgd_map computes it, unless the batch is spread over processes
            upsilon = self._global_upsilon if self.ctx.all_reduce is not None else None
        if self.cfg.loss == "trades" and target is None:
            with torch.no_grad(), eval_mode(model):
                target = model(x)
        with eval_mode(model):
            if self.cfg.loss == "trades":
                noise = self.example_noise(x, "normal")  # per example when the trainer keys the batch
                if noise is None:
                    noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
                start = (x + TRADES_START_STD * noise).clamp(0.0, 1.0)

                def objective(logits: torch.Tensor) -> torch.Tensor:
                    return trades_kl(target, logits)
            else:
                start = None

                def objective(logits: torch.Tensor) -> torch.Tensor:
                    return F.cross_entropy(logits, y, reduction="none")

            return wpgd_map(model, x, objective, budget=self.budget, q=2, steps=self.steps, ratio=self.ratio,
                            start=start, upsilon=upsilon)

    # -------------------------------------------------------------- the training step

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits_clean = target = None
        if self.cfg.loss == "trades":
            logits_clean, target = trades_target(model, x)
        x_adv, dist = self.adversarial(model, x, y, target)
        if self.cfg.loss == "trades" and logits_clean is None:
            logits_clean = model(x)  # clean before adversarial, as TRADES does
        logits_adv = model(x_adv)
        metrics: dict[str, float] = {"w2_dist": dist}
        if self.cfg.loss == "trades":
            loss = training_loss("trades", logits_adv, y, logits_clean=logits_clean, beta=self.cfg.beta)
            with torch.no_grad():
                metrics["kl"] = float(trades_kl(logits_clean, logits_adv).mean())
                metrics["clean_acc"] = accuracy(logits_clean, y)
        else:
            loss = training_loss("ce", logits_adv, y)
        metrics["adv_acc"] = accuracy(logits_adv, y)
        return StepOutput(loss=loss, metrics=metrics, x_adv=x_adv)

    # -------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["wdat"] = {"upsilon_sq": self.upsilon_sq.clone(), "upsilon_seen": self.upsilon_seen.clone(),
                         "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        own = state["wdat"]
        if own["upsilon_sq"].shape != self.upsilon_sq.shape:
            raise UserError(f"the checkpoint's wdat state has {own['upsilon_sq'].numel()} inner steps but "
                            f"--wdat-steps is {self.steps}: resume with the run's own settings")
        self.upsilon_sq.copy_(own["upsilon_sq"])
        self.upsilon_seen.copy_(own["upsilon_seen"])
        self.generator.set_state(own["generator"])
